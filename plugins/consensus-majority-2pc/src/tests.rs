//! Unit tests of one member and the plugin registration; the fault scenarios are in
//! `tests/simulation.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use optimystic_core::consensus::update_request;
use optimystic_core::identity::{Keypair, PeerId};
use optimystic_core::keynet::{ClusterPeers, PeerInfo};
use optimystic_core::model::{CommitRequest, CommitResult, PendPolicy, PendRequest, PendResult};
use optimystic_core::record::{ClusterPeer, ClusterRecord, VoteType};
use optimystic_core::registry::{PluginContext, Registry};
use optimystic_core::testkit::sim::{Envelope, SimConfig, SimNet, Verdict};
use optimystic_core::wire::{RepoMessage, RepoOperation, RepoResponse};
use optimystic_core::{Block, BlockId, ErrorCode, RawStorage, StorageError, Transforms, TrxId};
use optimystic_storage_memory::MemoryStorage;
use serde_json::{Value, json};

use super::*;

fn x() -> BlockId {
    BlockId::new("x").unwrap()
}

fn config() -> MajorityConfig {
    MajorityConfig { grace_ms: 100, marker_retention_ms: 10_000, ..MajorityConfig::default() }
}

struct Member {
    consensus: MajorityConsensus,
    keypair: Keypair,
    sim: SimNet,
    local: StorageRepo,
}

fn member() -> Member {
    member_over(Arc::new(MemoryStorage::new()))
}

fn member_over(storage: Arc<dyn RawStorage>) -> Member {
    let sim = SimNet::new(1, SimConfig::default());
    let keypair = Keypair::generate_ed25519();
    let local = StorageRepo::new(storage);
    let deps = MajorityDeps {
        keypair: keypair.clone(),
        network: sim.network(keypair.public().to_peer_id()),
        local: local.clone(),
        key_network: None,
        clock: sim.clock(),
        behind: None,
    };
    Member { consensus: MajorityConsensus::new(config(), deps).unwrap(), keypair, sim, local }
}

fn insert_x() -> RepoOperation {
    let block = Block::new(x(), "t", "c").with_field("v", json!(1));
    RepoOperation::Pend(PendRequest {
        trx_id: TrxId::new("t1").unwrap(),
        rev: Some(1),
        transforms: Transforms { inserts: BTreeMap::from([(x(), block)]), ..Transforms::default() },
        policy: PendPolicy::Continue,
    })
}

fn record(peers: &[PeerId], operation: RepoOperation, expiration_ms: u64) -> ClusterRecord {
    let peers = peers.iter().map(|p| (p.to_base58(), ClusterPeer::new(p, vec![]).unwrap())).collect();
    ClusterRecord::new(peers, serde_json::to_value(RepoMessage::new(operation, expiration_ms)).unwrap())
}

fn sign(record: &mut ClusterRecord, keypair: &Keypair, vote: VoteType, reason: Option<&str>) {
    let signed = record.sign_promise(keypair, vote, reason.map(str::to_owned)).unwrap();
    record.promises.insert(keypair.public().to_peer_id().to_base58(), signed);
}

async fn status(m: &Member, record: &ClusterRecord) -> Value {
    m.consensus.handle_cluster_request(PeerId::random(), json!({"operation": "status", "record": record.to_value()})).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_cluster_of_one_applies_locally_without_messages() {
    let m = member();
    let messages = Arc::new(AtomicUsize::new(0));
    let counter = messages.clone();
    m.sim.set_filter(Some(Arc::new(move |_: &Envelope<'_>| {
        counter.fetch_add(1, Ordering::SeqCst);
        Verdict::Deliver
    })));
    let me = m.keypair.public().to_peer_id();
    let peers: ClusterPeers = BTreeMap::from([(me, PeerInfo::default())]);
    let now = m.sim.clock().now_ms();
    let pended = m.consensus.execute(&peers, &RepoMessage::new(insert_x(), now + 1_000)).await.unwrap();
    assert!(matches!(pended, RepoResponse::Pend(PendResult::Success(_))), "{pended:?}");
    let commit = RepoOperation::Commit(CommitRequest {
        trx_id: TrxId::new("t1").unwrap(),
        block_ids: vec![x()],
        rev: 1,
        tail_id: x(),
        header_id: None,
    });
    let committed = m.consensus.execute(&peers, &RepoMessage::new(commit, now + 1_000)).await.unwrap();
    assert!(matches!(committed, RepoResponse::Commit(CommitResult::Success(_))), "{committed:?}");
    assert_eq!(m.local.latest_value(&x()).await.unwrap().0.map(|l| l.rev), Some(1));
    assert_eq!(messages.load(Ordering::SeqCst), 0);
    assert_eq!(m.consensus.live_reservations(), 0);
    // A get is not agreed, and an expired message never starts.
    let get = RepoOperation::Get(optimystic_core::model::BlockGets { block_ids: vec![x()], context: None, read_mode: None });
    let e = m.consensus.execute(&peers, &RepoMessage::new(get, now + 1_000)).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::BadRequest);
    let e = m.consensus.execute(&peers, &RepoMessage::new(insert_x(), now - 1)).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Expired);
}

#[tokio::test(start_paused = true)]
async fn lifecycle_status_answers_and_marker_collection() {
    let m = member();
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let me = m.keypair.public().to_peer_id();
    let peers = [me, a.public().to_peer_id(), b.public().to_peer_id()];
    let now = m.sim.clock().now_ms();
    let phase1 = record(&peers, insert_x(), now + 1_000);
    assert_eq!(status(&m, &phase1).await["status"], json!("pending"));

    let voted = m.consensus.on_update(PeerId::random(), phase1.clone()).await.unwrap();
    assert!(voted.promises[&me.to_base58()].is_approve());
    assert_eq!(m.consensus.live_reservations(), 1);
    assert_eq!(m.consensus.status_of(&phase1).await.unwrap(), Some(RecordStatus::Promised));
    // Re-delivery: the same vote.
    let again = m.consensus.on_update(PeerId::random(), phase1.clone()).await.unwrap();
    assert_eq!(again.promises[&me.to_base58()], voted.promises[&me.to_base58()]);

    // Phase 2 with the others' promises: applied once, the result travels next to the vote.
    let mut decided = phase1.clone();
    sign(&mut decided, &a, VoteType::Approve, None);
    sign(&mut decided, &b, VoteType::Approve, None);
    let executed = m.consensus.on_update(PeerId::random(), decided.clone()).await.unwrap();
    executed.verify(None).unwrap();
    assert!(executed.commits[&me.to_base58()].is_approve());
    assert_eq!(executed.extra[RESULT_FIELD]["success"], json!(true));
    assert_eq!(m.consensus.live_reservations(), 0);
    let redelivered = m.consensus.on_update(PeerId::random(), decided.clone()).await.unwrap();
    assert_eq!(redelivered.commits, executed.commits, "votes are final");
    let answer = status(&m, &decided).await;
    assert_eq!(answer["status"], json!("executed"));
    let copy = ClusterRecord::from_value(answer["record"].clone()).unwrap();
    copy.verify(None).unwrap();
    assert_eq!(copy.promises.len(), 2);

    // A record this member never saw, once expired, is one it did not execute.
    let other = record(&peers, RepoOperation::Cancel { trx_ref: optimystic_core::TrxBlocks { trx_id: TrxId::new("z").unwrap(), block_ids: vec![x()] } }, now + 500);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(status(&m, &other).await["status"], json!("not-executed"));
    // Expired records are refused for voting.
    let e = m.consensus.on_update(PeerId::random(), other).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Expired);

    // Past the retention the executed marker is collected.
    assert!(!m.consensus.collect_garbage().await.unwrap());
    assert_eq!(m.consensus.status_of(&decided).await.unwrap(), Some(RecordStatus::Executed));
    tokio::time::sleep(Duration::from_millis(config().marker_retention_ms + 1_000)).await;
    m.consensus.collect_garbage().await.unwrap();
    assert_eq!(m.consensus.status_of(&decided).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn provable_aborts_free_the_reservation_at_once() {
    let m = member();
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let me = m.keypair.public().to_peer_id();
    let peers = [me, a.public().to_peer_id(), b.public().to_peer_id()];
    let now = m.sim.clock().now_ms();
    let phase1 = record(&peers, insert_x(), now + 1_000);
    m.consensus.on_update(PeerId::random(), phase1.clone()).await.unwrap();
    assert_eq!(m.consensus.reserved_blocks().await, std::collections::BTreeSet::from([x()]));

    // One rejection leaves the quorum reachable: nothing changes.
    let mut one = phase1.clone();
    sign(&mut one, &a, VoteType::Reject, Some("conflict: elsewhere"));
    m.consensus.on_update(PeerId::random(), one.clone()).await.unwrap();
    assert_eq!(m.consensus.live_reservations(), 1);
    // Two rejections out of three: out of reach, aborted.
    sign(&mut one, &b, VoteType::Reject, Some("stale: moved on"));
    m.consensus.on_update(PeerId::random(), one).await.unwrap();
    assert_eq!(m.consensus.live_reservations(), 0);
    assert_eq!(m.consensus.status_of(&phase1).await.unwrap(), Some(RecordStatus::Aborted));
    assert_eq!(status(&m, &phase1).await["status"], json!("aborted"));
    m.consensus.wait_idle().await;

    // Refusals change nothing: a record without this member, a tampered one.
    let outsider = record(&peers[1..], insert_x(), now + 1_000);
    assert_eq!(m.consensus.on_update(PeerId::random(), outsider).await.unwrap_err().code(), ErrorCode::BadRequest);
    let mut tampered = phase1.clone();
    tampered.message["expiration"] = json!(now + 2_000);
    assert_eq!(m.consensus.on_update(PeerId::random(), tampered).await.unwrap_err().code(), ErrorCode::BadRequest);
    let far = record(&peers, insert_x(), now + 60_000);
    assert_eq!(m.consensus.on_update(PeerId::random(), far).await.unwrap_err().code(), ErrorCode::BadRequest);
    let unknown = m.consensus.handle_cluster_request(PeerId::random(), json!({"operation": "vote", "record": phase1.to_value()})).await;
    assert_eq!(unknown.unwrap_err().code(), ErrorCode::BadRequest);
    let update = m.consensus.handle_cluster_request(PeerId::random(), update_request(&phase1)).await.unwrap();
    assert_eq!(update["messageHash"], json!(phase1.message_hash));
}

#[tokio::test]
async fn registers_and_builds_from_the_node_context() {
    let sim = SimNet::new(1, SimConfig::default());
    let keypair = Keypair::generate_ed25519();
    let me = keypair.public().to_peer_id();
    let mut cx = PluginContext::new(me);
    let registry = Registry::linked();
    let kind = json!({"kind": "majority-2pc"});
    assert!(matches!(registry.build_consensus("majority-2pc", &cx, &kind), Err(PluginError::Missing(_))));
    cx.keypair = Some(keypair);
    cx.network = Some(sim.network(me));
    cx.local_repo = Some(StorageRepo::new(Arc::new(MemoryStorage::new())));
    registry.build_consensus("majority-2pc", &cx, &kind).unwrap();
    let bad = json!({"kind": "majority-2pc", "commit_threshold": 0});
    assert!(matches!(registry.build_consensus("majority-2pc", &cx, &bad), Err(PluginError::Config { .. })));
    cx.network = Some(sim.network(PeerId::random()));
    let e = registry.build_consensus("majority-2pc", &cx, &kind).unwrap_err();
    assert!(e.to_string().contains("is not the network's"), "{e}");
}

/// Memory storage that counts pends and can fail the next write of an executed marker.
#[derive(Debug, Default)]
struct FailingMarker {
    inner: MemoryStorage,
    pends_saved: AtomicUsize,
    fail_next_executed: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl RawStorage for FailingMarker {
    async fn latest(&self, b: &BlockId) -> Result<Option<optimystic_core::TrxRev>, StorageError> {
        self.inner.latest(b).await
    }
    async fn revisions(&self, b: &BlockId, from: u64, to: u64) -> Result<Vec<optimystic_core::TrxRev>, StorageError> {
        self.inner.revisions(b, from, to).await
    }
    async fn revision_at_or_before(&self, b: &BlockId, at: u64) -> Result<Option<optimystic_core::TrxRev>, StorageError> {
        self.inner.revision_at_or_before(b, at).await
    }
    async fn committed(&self, b: &BlockId, t: &TrxId) -> Result<Option<optimystic_core::CommittedTransform>, StorageError> {
        self.inner.committed(b, t).await
    }
    async fn pending(&self, b: &BlockId, t: &TrxId) -> Result<Option<optimystic_core::Transform>, StorageError> {
        self.inner.pending(b, t).await
    }
    async fn pending_trx_ids(&self, b: &BlockId) -> Result<Vec<TrxId>, StorageError> {
        self.inner.pending_trx_ids(b).await
    }
    async fn save_pending(&self, b: &BlockId, t: &TrxId, x: &optimystic_core::Transform) -> Result<(), StorageError> {
        self.pends_saved.fetch_add(1, Ordering::SeqCst);
        self.inner.save_pending(b, t, x).await
    }
    async fn delete_pending(&self, b: &BlockId, t: &TrxId) -> Result<(), StorageError> {
        self.inner.delete_pending(b, t).await
    }
    async fn materialized(&self, b: &BlockId, rev: u64) -> Result<Option<optimystic_core::BlockValue>, StorageError> {
        self.inner.materialized(b, rev).await
    }
    async fn commit_block(&self, b: &BlockId, c: &optimystic_core::BlockCommit) -> Result<(), StorageError> {
        self.inner.commit_block(b, c).await
    }
    async fn get_meta(&self, k: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get_meta(k).await
    }
    async fn put_meta(&self, k: &str, v: &[u8]) -> Result<(), StorageError> {
        self.inner.put_meta(k, v).await
    }
    async fn delete_meta(&self, k: &str) -> Result<(), StorageError> {
        self.inner.delete_meta(k).await
    }
    async fn write_meta(&self, writes: &[optimystic_core::MetaWrite]) -> Result<(), StorageError> {
        let executed = writes.iter().any(|w| {
            matches!(w, optimystic_core::MetaWrite::Put(_, v) if String::from_utf8_lossy(v).contains("\"status\":\"executed\""))
        });
        if executed && self.fail_next_executed.swap(false, Ordering::SeqCst) {
            return Err(StorageError::Full("injected: the executed marker does not fit".into()));
        }
        self.inner.write_meta(writes).await
    }
    async fn list_meta(&self, p: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.inner.list_meta(p, limit).await
    }
    fn durable(&self) -> bool {
        false
    }
    async fn block_ids(&self, after: Option<&BlockId>, limit: usize) -> Result<Vec<BlockId>, StorageError> {
        self.inner.block_ids(after, limit).await
    }
    async fn close(&self) -> Result<(), StorageError> {
        self.inner.close().await
    }
}

#[tokio::test(start_paused = true)]
async fn an_executed_marker_that_failed_to_save_is_retried_without_applying_again() {
    let storage = Arc::new(FailingMarker::default());
    let m = member_over(storage.clone());
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let me = m.keypair.public().to_peer_id();
    let peers = [me, a.public().to_peer_id(), b.public().to_peer_id()];
    let now = m.sim.clock().now_ms();
    let mut decided = record(&peers, insert_x(), now + 1_000);
    sign(&mut decided, &a, VoteType::Approve, None);
    sign(&mut decided, &b, VoteType::Approve, None);

    storage.fail_next_executed.store(true, Ordering::SeqCst);
    let failed = m.consensus.on_update(PeerId::random(), decided.clone()).await.unwrap_err();
    assert!(matches!(failed, RepoError::Storage(StorageError::Full(_))), "{failed}");
    assert_eq!(storage.pends_saved.load(Ordering::SeqCst), 1, "applied once");
    assert_eq!(m.consensus.live_reservations(), 1, "still reserved until the marker is saved");

    // Meanwhile the cluster cancels the transaction (a pend and the cancel of its own trx do not
    // conflict), and this member applies the cancel.
    let trx_ref = optimystic_core::model::TrxBlocks { trx_id: TrxId::new("t1").unwrap(), block_ids: vec![x()] };
    let mut cancel = record(&peers, RepoOperation::Cancel { trx_ref }, now + 1_000);
    sign(&mut cancel, &a, VoteType::Approve, None);
    sign(&mut cancel, &b, VoteType::Approve, None);
    assert!(m.consensus.on_update(PeerId::random(), cancel).await.unwrap().commits[&me.to_base58()].is_approve());
    assert!(m.local.storage().pending(&x(), &TrxId::new("t1").unwrap()).await.unwrap().is_none());

    // A re-delivery of the pend (or the recovery task) saves its marker without applying the pend
    // again: re-applying now would resurrect a transaction the cluster cancelled.
    let executed = m.consensus.on_update(PeerId::random(), decided.clone()).await.unwrap();
    assert!(executed.commits[&me.to_base58()].is_approve());
    assert_eq!(storage.pends_saved.load(Ordering::SeqCst), 1, "not applied twice");
    assert!(m.local.storage().pending(&x(), &TrxId::new("t1").unwrap()).await.unwrap().is_none(), "still cancelled");
    m.consensus.wait_idle().await;
    assert_eq!(m.consensus.live_reservations(), 0);
    assert_eq!(m.consensus.status_of(&decided).await.unwrap(), Some(RecordStatus::Executed));
}

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
use optimystic_core::kv::MemoryStorage;
use optimystic_core::model::{CommitRequest, CommitResult, PendPolicy, PendRequest, PendResult};
use optimystic_core::record::{ClusterPeer, ClusterRecord, VoteType};
use optimystic_core::registry::{ConsensusContext, Registry};
use optimystic_core::wire::{RepoMessage, RepoOperation, RepoResponse};
use optimystic_core::{Block, BlockId, ErrorCode, RawStorage, StorageError, StorageWrite, Transforms, TrxId};
use optimystic_testkit::sim::{Envelope, SimConfig, SimNet, Verdict};
use serde_json::{Value, json};

use super::*;
use crate::faulty::{RENOUNCE_FIELD, sign_renounce, verify_renounce};

fn x() -> BlockId {
    BlockId::new("x").unwrap()
}

fn config() -> MajorityConfig {
    MajorityConfig { grace_ms: 100, marker_retention_ms: 10_000, recovery_bound_ms: 5_000, ..MajorityConfig::default() }
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
    member_with(storage, Keypair::generate_ed25519())
}

fn member_with(storage: Arc<dyn RawStorage>, keypair: Keypair) -> Member {
    member_configured(storage, keypair, config(), None)
}

fn member_configured(
    storage: Arc<dyn RawStorage>,
    keypair: Keypair,
    config: MajorityConfig,
    key_network: Option<Arc<dyn optimystic_core::keynet::KeyNetwork>>,
) -> Member {
    let sim = SimNet::new(1, SimConfig::default());
    let local = StorageRepo::new(storage);
    let deps = MajorityDeps {
        keypair: keypair.clone(),
        network: sim.network(keypair.public().to_peer_id()),
        local: local.clone(),
        key_network,
        clock: sim.clock(),
        behind: None,
    };
    Member { consensus: MajorityConsensus::new(config, deps).unwrap(), keypair, sim, local }
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
    m.consensus
        .handle_cluster_request(PeerId::random(), json!({"operation": "status", "record": record.to_value()}))
        .await
        .unwrap()
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
    let get =
        RepoOperation::Get(optimystic_core::model::BlockGets { block_ids: vec![x()], context: None, read_mode: None });
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
    let other = record(
        &peers,
        RepoOperation::Cancel {
            trx_ref: optimystic_core::TrxBlocks { trx_id: TrxId::new("z").unwrap(), block_ids: vec![x()] },
        },
        now + 500,
    );
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
    let unknown = m
        .consensus
        .handle_cluster_request(PeerId::random(), json!({"operation": "vote", "record": phase1.to_value()}))
        .await;
    assert_eq!(unknown.unwrap_err().code(), ErrorCode::BadRequest);
    let update = m.consensus.handle_cluster_request(PeerId::random(), update_request(&phase1)).await.unwrap();
    assert_eq!(update["messageHash"], json!(phase1.message_hash));
}

#[tokio::test]
async fn registers_and_builds_from_the_node_context() {
    let sim = SimNet::new(1, SimConfig::default());
    let keypair = Keypair::generate_ed25519();
    let me = keypair.public().to_peer_id();
    let mut cx = ConsensusContext {
        keypair,
        network: sim.network(me),
        local_repo: StorageRepo::new(Arc::new(MemoryStorage::new())),
        key_network: Arc::new(Seen(vec![me])),
        behind: Arc::new(NoBehind),
    };
    let registry = Registry::linked();
    let kind = json!({"kind": "majority-2pc"});
    registry.build_consensus("majority-2pc", &cx, &kind).unwrap();
    let bad = json!({"kind": "majority-2pc", "commit_threshold": 0});
    assert!(matches!(registry.build_consensus("majority-2pc", &cx, &bad), Err(PluginError::Config { .. })));
    // A count below a majority of the key network's clusters is refused.
    let two = json!({"kind": "majority-2pc", "commit_threshold": 2});
    registry.build_consensus("majority-2pc", &cx, &two).unwrap();
    cx.key_network = Arc::new(Seen((0..5).map(|_| PeerId::random()).collect()));
    let e = registry.build_consensus("majority-2pc", &cx, &two).unwrap_err();
    assert!(e.to_string().contains("below a majority of the cluster size 5"), "{e}");
    cx.network = sim.network(PeerId::random());
    let e = registry.build_consensus("majority-2pc", &cx, &kind).unwrap_err();
    assert!(e.to_string().contains("is not the network's"), "{e}");
}

/// Memory storage that counts pends and can fail the next write of an executed marker. With
/// `atomic`, its storage steps are all-or-nothing (as on LMDB); without, they are applied one
/// write at a time (as on the file engine). Reads of 2pc entries take `slow_entry_reads_ms` (of
/// virtual time) each.
#[derive(Debug, Default)]
struct FailingMarker {
    inner: MemoryStorage,
    pends_saved: AtomicUsize,
    slow_entry_reads_ms: std::sync::atomic::AtomicU64,
    fail_next_executed: std::sync::atomic::AtomicBool,
    atomic: bool,
}

fn is_executed_marker(write: &optimystic_core::MetaWrite) -> bool {
    matches!(write, optimystic_core::MetaWrite::Put(_, v) if String::from_utf8_lossy(v).contains("\"status\":\"executed\""))
}

#[async_trait::async_trait]
impl RawStorage for FailingMarker {
    async fn latest(&self, b: &BlockId) -> Result<Option<optimystic_core::TrxRev>, StorageError> {
        self.inner.latest(b).await
    }
    async fn revisions(&self, b: &BlockId, from: u64, to: u64) -> Result<Vec<optimystic_core::TrxRev>, StorageError> {
        self.inner.revisions(b, from, to).await
    }
    async fn revision_at_or_before(
        &self,
        b: &BlockId,
        at: u64,
    ) -> Result<Option<optimystic_core::TrxRev>, StorageError> {
        self.inner.revision_at_or_before(b, at).await
    }
    async fn committed(
        &self,
        b: &BlockId,
        t: &TrxId,
    ) -> Result<Option<optimystic_core::CommittedTransform>, StorageError> {
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
        let slow_ms = self.slow_entry_reads_ms.load(Ordering::SeqCst);
        if slow_ms > 0 && k.starts_with(store::ENTRY_PREFIX) {
            tokio::time::sleep(Duration::from_millis(slow_ms)).await;
        }
        self.inner.get_meta(k).await
    }
    async fn put_meta(&self, k: &str, v: &[u8]) -> Result<(), StorageError> {
        self.inner.put_meta(k, v).await
    }
    async fn delete_meta(&self, k: &str) -> Result<(), StorageError> {
        self.inner.delete_meta(k).await
    }
    async fn write_meta(&self, writes: &[optimystic_core::MetaWrite]) -> Result<(), StorageError> {
        if writes.iter().any(is_executed_marker) && self.fail_next_executed.swap(false, Ordering::SeqCst) {
            return Err(StorageError::Full("injected: the executed marker does not fit".into()));
        }
        self.inner.write_meta(writes).await
    }
    async fn apply(&self, writes: &[StorageWrite]) -> Result<(), StorageError> {
        if !self.atomic {
            return optimystic_core::storage::apply_in_order(self, writes).await;
        }
        let executed = writes.iter().any(|w| matches!(w, StorageWrite::Meta(m) if is_executed_marker(m)));
        if executed && self.fail_next_executed.swap(false, Ordering::SeqCst) {
            return Err(StorageError::Full("injected: the executed marker does not fit".into()));
        }
        let pends = writes.iter().filter(|w| matches!(w, StorageWrite::SavePending { .. })).count();
        self.inner.apply(writes).await?;
        self.pends_saved.fetch_add(pends, Ordering::SeqCst);
        Ok(())
    }
    fn atomic_apply(&self) -> bool {
        self.atomic
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

/// A three-peer record inserting `x`, approved by the two other peers: decided.
struct Decided {
    a: Keypair,
    b: Keypair,
    me: PeerId,
    peers: [PeerId; 3],
    now: u64,
    record: ClusterRecord,
}

fn decided_insert(m: &Member) -> Decided {
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let me = m.keypair.public().to_peer_id();
    let peers = [me, a.public().to_peer_id(), b.public().to_peer_id()];
    let now = m.sim.clock().now_ms();
    let mut decided = record(&peers, insert_x(), now + 1_000);
    sign(&mut decided, &a, VoteType::Approve, None);
    sign(&mut decided, &b, VoteType::Approve, None);
    Decided { a, b, me, peers, now, record: decided }
}

#[tokio::test(start_paused = true)]
async fn an_executed_marker_that_failed_to_save_is_retried_without_applying_again() {
    let storage = Arc::new(FailingMarker::default());
    let m = member_over(storage.clone());
    let Decided { a, b, me, peers, now, record: decided } = decided_insert(&m);

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

#[tokio::test(start_paused = true)]
async fn a_failed_atomic_step_applies_nothing_and_the_record_executes_later() {
    let storage = Arc::new(FailingMarker { atomic: true, ..FailingMarker::default() });
    let m = member_over(storage.clone());
    let Decided { me, record: decided, .. } = decided_insert(&m);
    let t1 = TrxId::new("t1").unwrap();

    // The step carrying the pend, its evidence and its executed marker fails as a whole.
    storage.fail_next_executed.store(true, Ordering::SeqCst);
    let failed = m.consensus.on_update(PeerId::random(), decided.clone()).await.unwrap_err();
    assert!(matches!(failed, RepoError::Storage(StorageError::Full(_))), "{failed}");
    assert_eq!(storage.pends_saved.load(Ordering::SeqCst), 0, "nothing of the step was applied");
    assert!(m.local.storage().pending(&x(), &t1).await.unwrap().is_none());
    assert!(m.local.evidence(&x(), 1).await.unwrap().is_none());
    assert_eq!(m.consensus.live_reservations(), 1, "still reserved");
    assert_eq!(
        m.consensus.status_of(&decided).await.unwrap(),
        Some(RecordStatus::Decided),
        "persisted as decided, for recovery to execute"
    );

    // A re-delivery (or the recovery task) executes it once.
    let executed = m.consensus.on_update(PeerId::random(), decided.clone()).await.unwrap();
    assert!(executed.commits[&me.to_base58()].is_approve());
    assert_eq!(storage.pends_saved.load(Ordering::SeqCst), 1, "applied once");
    assert!(m.local.storage().pending(&x(), &t1).await.unwrap().is_some());
    m.consensus.wait_idle().await;
    assert_eq!(m.consensus.live_reservations(), 0);
    assert_eq!(m.consensus.status_of(&decided).await.unwrap(), Some(RecordStatus::Executed));
}

// ---------------------------------------------------------------------------------------------
// Replication integrity: one test per finding of the replication issue (each fails on the code
// before it, passes after).

fn trx(text: &str) -> TrxId {
    TrxId::new(text).unwrap()
}

fn set_v(trx_id: &str, rev: Option<u64>, v: i64) -> RepoOperation {
    RepoOperation::Pend(PendRequest {
        trx_id: trx(trx_id),
        rev,
        transforms: Transforms::single(
            &x(),
            &optimystic_core::Transform {
                updates: Some(vec![optimystic_core::BlockOperation::set("v", json!(v))]),
                ..optimystic_core::Transform::default()
            },
        ),
        policy: PendPolicy::Continue,
    })
}

fn commit_op(trx_id: &str, rev: u64) -> RepoOperation {
    RepoOperation::Commit(CommitRequest {
        trx_id: trx(trx_id),
        block_ids: vec![x()],
        rev,
        tail_id: x(),
        header_id: None,
    })
}

/// The record for `operation` with approving promises of `a` and `b` (a decided record).
fn decided(peers: &[PeerId], operation: RepoOperation, expiration_ms: u64, a: &Keypair, b: &Keypair) -> ClusterRecord {
    let mut r = record(peers, operation, expiration_ms);
    sign(&mut r, a, VoteType::Approve, None);
    sign(&mut r, b, VoteType::Approve, None);
    r
}

/// Puts block x at revision 1 (t1) directly in the member's storage.
async fn x_at_rev_1(m: &Member) {
    let o = optimystic_core::MessageOptions::default();
    let RepoOperation::Pend(pend) = insert_x() else { unreachable!() };
    optimystic_core::Repo::pend(&m.local, &pend, &o).await.unwrap();
    let RepoOperation::Commit(commit) = commit_op("t1", 1) else { unreachable!() };
    assert!(matches!(optimystic_core::Repo::commit(&m.local, &commit, &o).await.unwrap(), CommitResult::Success(_)));
}

struct Three {
    m: Member,
    a: Keypair,
    b: Keypair,
    peers: [PeerId; 3],
}

fn three() -> Three {
    let m = member();
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let peers = [m.keypair.public().to_peer_id(), a.public().to_peer_id(), b.public().to_peer_id()];
    Three { m, a, b, peers }
}

/// Finding 1 / SPEC 2 item 7 and 4.6: a decided record on a base this member does not hold is
/// neither applied nor approved; it waits, and runs once catch-up brought the block forward.
#[tokio::test(start_paused = true)]
async fn a_decided_commit_on_a_missing_base_waits_for_catch_up() {
    let Three { m, a, b, peers } = three();
    let me = peers[0].to_base58();
    x_at_rev_1(&m).await;
    let o = optimystic_core::MessageOptions::default();
    // t3 is pending here (a single node's pend has no gap rule), but revision 2 is missing.
    let RepoOperation::Pend(p3) = set_v("t3", Some(3), 3) else { unreachable!() };
    optimystic_core::Repo::pend(&m.local, &p3, &o).await.unwrap();
    let now = m.sim.clock().now_ms();
    let commit3 = decided(&peers, commit_op("t3", 3), now + 1_000, &a, &b);
    let reply = m.consensus.on_update(peers[1], commit3.clone()).await.unwrap();
    assert!(!reply.commits.contains_key(&me), "no commit vote without the base: {:?}", reply.commits);
    assert_eq!(m.local.storage().latest(&x()).await.unwrap().map(|l| l.rev), Some(1), "nothing applied on a gap");
    assert_eq!(m.consensus.status_of(&commit3).await.unwrap(), Some(RecordStatus::Decided));
    // A decided pend with a gap waits the same way.
    let pend4 = decided(&peers, set_v("t4", Some(4), 4), now + 1_000, &a, &b);
    let reply = m.consensus.on_update(peers[1], pend4.clone()).await.unwrap();
    assert!(!reply.commits.contains_key(&me));
    assert!(m.local.storage().pending(&x(), &trx("t4")).await.unwrap().is_none());

    // Catch-up brings revision 2; the waiting commit then runs on the right base.
    let t2 = optimystic_core::TrxRev { trx_id: trx("t2"), rev: 2 };
    let set2 = optimystic_core::Transform {
        updates: Some(vec![optimystic_core::BlockOperation::set("v", json!(2))]),
        ..optimystic_core::Transform::default()
    };
    assert!(m.local.apply_replica(&x(), &t2, &set2, None).await.unwrap());
    m.consensus.caught_up(&x()).await;
    assert_eq!(m.consensus.status_of(&commit3).await.unwrap(), Some(RecordStatus::Executed));
    let (latest, value) = m.local.latest_value(&x()).await.unwrap();
    assert_eq!(latest.map(|l| l.rev), Some(3));
    assert_eq!(value.unwrap().fields["v"], json!(3));
    let again = m.consensus.on_update(peers[1], commit3).await.unwrap();
    assert!(again.commits[&me].is_approve(), "applied here on the right base");
    // The member kept the commit record as the revision's evidence.
    let evidence = m.local.evidence(&x(), 3).await.unwrap().unwrap();
    assert_eq!(evidence.commit["messageHash"], json!(again.message_hash));
}

/// Finding 4: an approving commit vote means "applied here"; a stale result is signed reject.
#[tokio::test(start_paused = true)]
async fn a_stale_result_is_signed_as_a_reject() {
    let Three { m, a, b, peers } = three();
    x_at_rev_1(&m).await;
    let o = optimystic_core::MessageOptions::default();
    let RepoOperation::Pend(p9) = set_v("t9", None, 9) else { unreachable!() };
    optimystic_core::Repo::pend(&m.local, &p9, &o).await.unwrap();
    let now = m.sim.clock().now_ms();
    let commit = decided(&peers, commit_op("t9", 1), now + 1_000, &a, &b);
    let reply = m.consensus.on_update(peers[1], commit).await.unwrap();
    let vote = &reply.commits[&peers[0].to_base58()];
    assert_eq!(vote.r#type, VoteType::Reject);
    assert!(vote.reject_reason.as_deref().unwrap().starts_with("stale: "), "{vote:?}");
    assert_eq!(reply.extra[RESULT_FIELD]["success"], json!(false));
}

/// Finding 5 / SPEC 4.12: two pends of one trx with different transforms conflict.
#[tokio::test(start_paused = true)]
async fn two_pends_of_one_trx_with_different_transforms_conflict() {
    let Three { m, peers, .. } = three();
    x_at_rev_1(&m).await;
    let now = m.sim.clock().now_ms();
    let first = m.consensus.on_update(peers[1], record(&peers, set_v("t5", Some(2), 1), now + 1_000)).await.unwrap();
    assert!(first.promises[&peers[0].to_base58()].is_approve());
    let other = m.consensus.on_update(peers[2], record(&peers, set_v("t5", Some(2), 2), now + 1_000)).await.unwrap();
    let vote = &other.promises[&peers[0].to_base58()];
    assert_eq!(vote.r#type, VoteType::Reject);
    assert!(vote.reject_reason.as_deref().unwrap().starts_with("conflict: "), "{vote:?}");
}

/// Finding 6 / SPEC 4.12, and issue 21 finding 9 / SPEC 4.10: a cancelled trx cannot be pended
/// again on the block (tombstone), by any path. The pend of t6 is decided and its copy to this
/// member delayed; the cancel of t6 is decided and executed here first; the late decided pend
/// must not apply (nor get an approving commit vote), and no later record of it either.
#[tokio::test(start_paused = true)]
async fn a_cancelled_pend_never_comes_back() {
    let Three { m, a, b, peers } = three();
    let me = peers[0].to_base58();
    x_at_rev_1(&m).await;
    let now = m.sim.clock().now_ms();
    let pend = record(&peers, set_v("t6", Some(2), 6), now + 1_000);
    let promised = m.consensus.on_update(peers[1], pend.clone()).await.unwrap();
    assert!(promised.promises[&me].is_approve());
    let cancel =
        RepoOperation::Cancel { trx_ref: optimystic_core::TrxBlocks { trx_id: trx("t6"), block_ids: vec![x()] } };
    let done = m.consensus.on_update(peers[1], decided(&peers, cancel, now + 1_000, &a, &b)).await.unwrap();
    assert!(done.commits[&me].is_approve());
    // The pend's decided copy arrives late, with its promise quorum.
    let mut late = pend.clone();
    sign(&mut late, &a, VoteType::Approve, None);
    sign(&mut late, &b, VoteType::Approve, None);
    let answer = m.consensus.on_update(peers[1], late.clone()).await.unwrap();
    let vote = &answer.commits[&me];
    assert_eq!(vote.r#type, VoteType::Reject, "no approving commit vote for a pend after its cancel: {vote:?}");
    assert!(vote.reject_reason.as_deref().unwrap().contains("cancelled"), "{vote:?}");
    assert!(m.local.storage().pending(&x(), &trx("t6")).await.unwrap().is_none(), "the late pend applied");
    assert_eq!(m.consensus.live_reservations(), 0);
    // Re-delivered: the same answer, still nothing pending.
    let again = m.consensus.on_update(peers[2], late).await.unwrap();
    assert_eq!(again.commits[&me], *vote, "votes are final");
    assert!(m.local.storage().pending(&x(), &trx("t6")).await.unwrap().is_none());
    // Another record of the pend is refused in phase 1, and not applied when decided either.
    let other = m.consensus.on_update(peers[1], record(&peers, set_v("t6", Some(2), 7), now + 1_000)).await.unwrap();
    let vote = &other.promises[&me];
    assert_eq!(vote.r#type, VoteType::Reject);
    assert!(vote.reject_reason.as_deref().unwrap().contains("cancelled"), "{vote:?}");
    let decided_other = decided(&peers, set_v("t6", Some(2), 8), now + 1_000, &a, &b);
    let answer = m.consensus.on_update(peers[1], decided_other).await.unwrap();
    assert_eq!(answer.commits[&me].r#type, VoteType::Reject);
    assert!(m.local.storage().pending(&x(), &trx("t6")).await.unwrap().is_none());
}

/// Behind reports, dropped (these tests run no catch-up).
#[derive(Debug)]
struct NoBehind;

impl optimystic_core::consensus::BehindSink for NoBehind {
    fn behind(&self, _block_id: &BlockId) {}
}

/// A key network seeing exactly `peers`.
#[derive(Debug)]
struct Seen(Vec<PeerId>);

#[async_trait::async_trait]
impl optimystic_core::keynet::KeyNetwork for Seen {
    async fn find_cluster(
        &self,
        _block_id: &BlockId,
    ) -> Result<ClusterPeers, optimystic_core::keynet::KeyNetworkError> {
        Ok(self.0.iter().map(|p| (*p, PeerInfo::default())).collect())
    }
    async fn find_coordinator(
        &self,
        _b: &BlockId,
        _e: &[PeerId],
    ) -> Result<PeerId, optimystic_core::keynet::KeyNetworkError> {
        Ok(self.0[0])
    }
    fn cluster_size(&self) -> usize {
        self.0.len()
    }
    async fn has_seen(&self, peer: &PeerId) -> bool {
        self.0.contains(peer)
    }
}

/// Finding 7 / SPEC 4.11: a record naming a never-seen peer pins nothing, and one sender cannot
/// take every reservation; a reservation is given back when its record is settled.
#[tokio::test(start_paused = true)]
async fn made_up_peers_and_one_sender_cannot_pin_blocks() {
    let sim = SimNet::new(1, SimConfig::default());
    let keypair = Keypair::generate_ed25519();
    let me = keypair.public().to_peer_id();
    let ed25519 = || Keypair::generate_ed25519().public().to_peer_id();
    let (ka, kb) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let (a, b) = (ka.public().to_peer_id(), kb.public().to_peer_id());
    let local = StorageRepo::new(Arc::new(MemoryStorage::new()));
    let deps = MajorityDeps {
        keypair,
        network: sim.network(me),
        local,
        key_network: Some(Arc::new(Seen(vec![me, a, b]))),
        clock: sim.clock(),
        behind: None,
    };
    let config = MajorityConfig {
        max_reservations: 10,
        max_reservations_per_sender: 2,
        max_reservations_outsiders: 2,
        max_record_blocks: 2,
        max_batch_ops: 2,
        ..config()
    };
    let consensus = MajorityConsensus::new(config, deps).unwrap();
    let now = sim.clock().now_ms();
    let made_up = ed25519();
    let pinning = record(&[me, a, made_up], insert_x(), now + 1_000);
    let e = consensus.on_update(a, pinning).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::BadRequest);
    assert!(e.to_string().contains("never seen"), "{e}");
    assert_eq!(consensus.live_reservations(), 0);

    let insert = |id: &str| {
        let block = Block::new(BlockId::new(id).unwrap(), "t", "c");
        RepoOperation::Pend(PendRequest {
            trx_id: trx(&format!("i-{id}")),
            rev: Some(1),
            transforms: Transforms {
                inserts: BTreeMap::from([(BlockId::new(id).unwrap(), block)]),
                ..Transforms::default()
            },
            policy: PendPolicy::Continue,
        })
    };
    let spammer = ed25519();
    let mut votes = Vec::new();
    let mut records = Vec::new();
    for id in ["p1", "p2", "p3"] {
        let sent = record(&[me, a, b], insert(id), now + 1_000);
        let answer = consensus.on_update(spammer, sent.clone()).await.unwrap();
        votes.push(answer.promises[&me.to_base58()].clone());
        records.push(sent);
    }
    assert!(votes[0].is_approve() && votes[1].is_approve());
    assert!(votes[2].reject_reason.as_deref().unwrap().starts_with("busy: "), "{:?}", votes[2]);
    let honest = consensus.on_update(a, record(&[me, a, b], insert("p4"), now + 1_000)).await.unwrap();
    assert!(honest.promises[&me.to_base58()].is_approve(), "other senders are still served");
    assert_eq!(consensus.live_reservations(), 3);
    // The other two peers rejected p1: it can never be decided, so its reservation goes at
    // once, and the budget it took is given back (the spammer's next record is served).
    let mut aborted = records[0].clone();
    sign(&mut aborted, &ka, VoteType::Reject, Some("conflict: elsewhere"));
    sign(&mut aborted, &kb, VoteType::Reject, Some("conflict: elsewhere"));
    consensus.on_update(spammer, aborted).await.unwrap();
    assert_eq!(consensus.live_reservations(), 2);
    let again = consensus.on_update(spammer, record(&[me, a, b], insert("p5"), now + 1_000)).await.unwrap();
    assert!(again.promises[&me.to_base58()].is_approve(), "the released budget serves the next record");
    // Minting a new sender id does not buy a new budget.
    let busy = consensus.on_update(ed25519(), record(&[me, a, b], insert("p6"), now + 1_000)).await.unwrap();
    assert!(
        busy.promises[&me.to_base58()].reject_reason.as_deref().unwrap().starts_with("busy: "),
        "a fresh sender id outside the cluster shares the outsiders' budget"
    );
    // A record naming no block is refused.
    let empty = RepoOperation::Cancel { trx_ref: optimystic_core::TrxBlocks { trx_id: trx("e"), block_ids: vec![] } };
    assert_eq!(
        consensus.on_update(a, record(&[me, a, b], empty, now + 1_000)).await.unwrap_err().code(),
        ErrorCode::BadRequest
    );
}

/// A key network seeing exactly `peers` that counts its cluster lookups.
#[derive(Debug)]
struct CountedSeen(Seen, AtomicUsize);

#[async_trait::async_trait]
impl optimystic_core::keynet::KeyNetwork for CountedSeen {
    async fn find_cluster(&self, block_id: &BlockId) -> Result<ClusterPeers, optimystic_core::keynet::KeyNetworkError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.find_cluster(block_id).await
    }
    async fn find_coordinator(
        &self,
        b: &BlockId,
        e: &[PeerId],
    ) -> Result<PeerId, optimystic_core::keynet::KeyNetworkError> {
        self.0.find_coordinator(b, e).await
    }
    fn cluster_size(&self) -> usize {
        self.0.cluster_size()
    }
    async fn has_seen(&self, peer: &PeerId) -> bool {
        self.0.has_seen(peer).await
    }
}

fn cancel_of(trx_id: &str, blocks: impl IntoIterator<Item = String>) -> RepoOperation {
    let block_ids = blocks.into_iter().map(|b| BlockId::new(b).unwrap()).collect();
    RepoOperation::Cancel { trx_ref: optimystic_core::TrxBlocks { trx_id: trx(trx_id), block_ids } }
}

/// Issue 21 finding 5 / SPEC 4.10, 4.20 "Sybil senders": one cancel naming 2,000 blocks is
/// refused before any cluster lookup; a reservation weighs the blocks it names; and fresh sender
/// ids outside the cluster share one budget instead of each getting its own.
#[tokio::test(start_paused = true)]
async fn reservations_weigh_blocks_and_minted_senders_share_one_budget() {
    let sim = SimNet::new(1, SimConfig::default());
    let keypair = Keypair::generate_ed25519();
    let me = keypair.public().to_peer_id();
    let ed25519 = || Keypair::generate_ed25519().public().to_peer_id();
    let (a, b) = (ed25519(), ed25519());
    let lookups = Arc::new(CountedSeen(Seen(vec![me, a, b]), AtomicUsize::new(0)));
    let deps = MajorityDeps {
        keypair,
        network: sim.network(me),
        local: StorageRepo::new(Arc::new(MemoryStorage::new())),
        key_network: Some(lookups.clone()),
        clock: sim.clock(),
        behind: None,
    };
    let config = MajorityConfig {
        max_reservations: 100,
        max_reservations_per_sender: 20,
        max_reservations_outsiders: 30,
        max_record_blocks: 50,
        max_batch_ops: 2,
        ..config()
    };
    let consensus = MajorityConsensus::new(config, deps).unwrap();
    let now = sim.clock().now_ms();
    let peers = [me, a, b];
    let vote_of = |answer: &ClusterRecord| answer.promises[&me.to_base58()].clone();

    // One cancel naming 2,000 blocks: refused before a single cluster lookup, nothing held.
    let huge = cancel_of("huge", (0..2_000).map(|i| format!("h{i}")));
    let e = consensus.on_update(a, record(&peers, huge, now + 1_000)).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::BadRequest, "{e}");
    assert!(e.to_string().contains("max_record_blocks"), "{e}");
    assert_eq!(lookups.1.load(Ordering::SeqCst), 0, "no lookup before the size bound");
    assert_eq!(consensus.live_reservations(), 0);

    // A cancel naming 20 blocks weighs 20: the sender's budget (20 blocks) is full after it.
    let twenty = cancel_of("c20", (0..20).map(|i| format!("a{i}")));
    assert!(vote_of(&consensus.on_update(a, record(&peers, twenty, now + 1_000)).await.unwrap()).is_approve());
    assert_eq!(lookups.1.load(Ordering::SeqCst), 20, "one lookup per block, bounded by max_record_blocks");
    let one_more = consensus.on_update(a, record(&peers, cancel_of("c1", ["a99".to_owned()]), now + 1_000)).await;
    let vote = vote_of(&one_more.unwrap());
    assert!(vote.reject_reason.as_deref().unwrap().starts_with("busy: "), "{vote:?}");

    // Five fresh ids outside the cluster, 10 blocks each: they share 30 blocks, not 5 x 20.
    let mut approved = 0;
    for n in 0..5 {
        let cancel = cancel_of(&format!("s{n}"), (0..10).map(|i| format!("s{n}-{i}")));
        let answer = consensus.on_update(ed25519(), record(&peers, cancel, now + 1_000)).await;
        match answer {
            Ok(answer) if vote_of(&answer).is_approve() => approved += 1,
            Ok(answer) => assert!(vote_of(&answer).reject_reason.as_deref().unwrap().starts_with("busy: ")),
            Err(e) => assert_eq!(e.code(), ErrorCode::Busy, "{e}"),
        }
    }
    assert_eq!(approved, 3, "the outsiders' shared budget holds 30 blocks");
    // A sender in the cluster still has its own budget.
    let from_b = cancel_of("b", (0..5).map(|i| format!("b{i}")));
    assert!(vote_of(&consensus.on_update(b, record(&peers, from_b, now + 1_000)).await.unwrap()).is_approve());
}

/// Issue 21 finding 10: expired cancel tombstones are collected however many live ones sort
/// before them (the collection used to look at the first 256 keys only, for ever).
#[tokio::test(start_paused = true)]
async fn expired_tombstones_past_the_first_256_are_collected() {
    let m = member();
    let storage = m.local.storage().clone();
    let now = m.sim.clock().now_ms();
    let keep = (now + 1_000_000).to_string();
    let gone = now.saturating_sub(1).to_string();
    for i in 0..600 {
        let key = crate::store::tomb_key(&BlockId::new(format!("a{i:04}")).unwrap(), &trx("t"));
        storage.put_meta(&key, keep.as_bytes()).await.unwrap();
    }
    for i in 0..50 {
        let key = crate::store::tomb_key(&BlockId::new(format!("z{i:04}")).unwrap(), &trx("t"));
        storage.put_meta(&key, gone.as_bytes()).await.unwrap();
    }
    let count = |prefix: String| {
        let storage = storage.clone();
        async move { storage.list_meta(&prefix, 10_000).await.unwrap().len() }
    };
    let z_prefix = crate::store::tomb_key(&BlockId::new("z").unwrap(), &trx("t"));
    let z_prefix = z_prefix.split_at(z_prefix.len() - "/74".len()).0.to_owned();
    assert_eq!(count(z_prefix.clone()).await, 50);
    for _ in 0..20 {
        m.consensus.collect_garbage().await.unwrap();
    }
    assert_eq!(count(z_prefix).await, 0, "the expired tombstones sorting last were collected");
    assert_eq!(count(crate::store::TOMB_PREFIX.to_owned()).await, 600, "live tombstones stay");
}

/// Counts behind reports.
#[derive(Debug, Default)]
struct CountBehind(AtomicUsize);

impl optimystic_core::consensus::BehindSink for CountBehind {
    fn behind(&self, _block_id: &BlockId) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A member seeing the cluster `{me, a, b}`, with `config`, reporting behind blocks to `behind`.
fn seeing_member(config: MajorityConfig, behind: Arc<CountBehind>) -> (Member, [PeerId; 3]) {
    let ed25519 = || Keypair::generate_ed25519().public().to_peer_id();
    let storage: Arc<dyn RawStorage> = Arc::new(MemoryStorage::new());
    seeing_member_over(config, behind, storage, Keypair::generate_ed25519(), [ed25519(), ed25519()])
}

/// [`seeing_member`] over `storage`, as `keypair`, with `others` as `a` and `b`.
fn seeing_member_over(
    config: MajorityConfig,
    behind: Arc<CountBehind>,
    storage: Arc<dyn RawStorage>,
    keypair: Keypair,
    others: [PeerId; 2],
) -> (Member, [PeerId; 3]) {
    let sim = SimNet::new(1, SimConfig::default());
    let me = keypair.public().to_peer_id();
    let peers = [me, others[0], others[1]];
    let local = StorageRepo::new(storage);
    let deps = MajorityDeps {
        keypair: keypair.clone(),
        network: sim.network(me),
        local: local.clone(),
        key_network: Some(Arc::new(Seen(peers.to_vec()))),
        clock: sim.clock(),
        behind: Some(behind),
    };
    let consensus = MajorityConsensus::new(config, deps).unwrap();
    (Member { consensus, keypair, sim, local }, peers)
}

/// The stored 2pc entries of rejected records.
async fn rejected_entries(m: &Member) -> usize {
    let entries = m.local.storage().list_meta(crate::store::ENTRY_PREFIX, 100_000).await.unwrap();
    entries.iter().filter(|(_, bytes)| String::from_utf8_lossy(bytes).contains(r#""status":"rejected""#)).count()
}

/// Issue 21 finding 6 / SPEC 4.10, 4.20: rejections of records from anyone naming the real
/// cluster are stored within a budget per sender in the cluster and one shared by the others
/// (past it: `busy`, no vote, nothing stored), and are released at the record's expiration plus
/// grace, not kept for the marker retention.
#[tokio::test(start_paused = true)]
async fn stored_rejections_are_bounded_and_released_at_expiration_plus_grace() {
    let config = MajorityConfig {
        max_rejections_per_sender: 20,
        max_rejections: 40,
        max_record_blocks: 20,
        max_batch_ops: 2,
        ..config()
    };
    let (m, peers) = seeing_member(config.clone(), Arc::new(CountBehind::default()));
    let me = peers[0].to_base58();
    let now = m.sim.clock().now_ms();
    let unknown = |n: usize| set_on(&format!("u{n}"), &format!("t{n}"), Some(2), 1);
    let (mut stored, mut busy) = (0, 0);
    let mut first = None;
    for n in 0..30 {
        let sent = record(&peers, unknown(n), now + 1_000);
        match m.consensus.on_update(PeerId::random(), sent.clone()).await {
            Ok(answer) => {
                assert!(answer.promises[&me].reject_reason.as_deref().unwrap().starts_with("behind: "));
                stored += 1;
                first.get_or_insert((sent, answer.promises[&me].clone()));
            }
            Err(e) => {
                assert_eq!(e.code(), ErrorCode::Busy, "{e}");
                busy += 1;
            }
        }
    }
    assert_eq!((stored, busy), (20, 10), "minted sender ids share one budget");
    assert_eq!(rejected_entries(&m).await, 20);
    // A sender in the cluster has its own budget.
    for n in 100..105 {
        let answer = m.consensus.on_update(peers[1], record(&peers, unknown(n), now + 1_000)).await.unwrap();
        assert!(!answer.promises[&me].is_approve());
    }
    assert_eq!(rejected_entries(&m).await, 25);
    // Votes are final: a re-delivery gets the stored vote.
    let (sent, vote) = first.unwrap();
    assert_eq!(m.consensus.on_update(PeerId::random(), sent).await.unwrap().promises[&me], vote);

    // At expiration plus grace (far before the marker retention) they are gone, and the budget
    // serves again.
    tokio::time::sleep(Duration::from_millis(1_000 + config.grace_ms + 1)).await;
    assert!(config.marker_retention_ms > 1_000 + config.grace_ms + 1);
    m.consensus.collect_garbage().await.unwrap();
    assert_eq!(rejected_entries(&m).await, 0, "rejections are kept until expiration plus grace only");
    let later = m.sim.clock().now_ms();
    for n in 200..220 {
        let again = m.consensus.on_update(PeerId::random(), record(&peers, unknown(n), later + 1_000)).await.unwrap();
        assert!(again.promises[&me].reject_reason.as_deref().unwrap().starts_with("behind: "));
    }
    // A member at its bound collects what expired before it answers `busy`, without waiting for
    // the periodic collection.
    tokio::time::sleep(Duration::from_millis(1_000 + config.grace_ms + 1)).await;
    let last = m.sim.clock().now_ms();
    let served = m.consensus.on_update(PeerId::random(), record(&peers, unknown(300), last + 1_000)).await.unwrap();
    assert!(served.promises[&me].reject_reason.as_deref().unwrap().starts_with("behind: "));
    assert_eq!(rejected_entries(&m).await, 1);
}

/// Issue 21 finding 6: stored rejections are counted again after a restart (from their index),
/// so restarting does not reset their bound.
#[tokio::test(start_paused = true)]
async fn stored_rejections_count_against_the_bound_after_a_restart() {
    let config = MajorityConfig {
        max_rejections_per_sender: 3,
        max_rejections: 6,
        max_record_blocks: 2,
        max_batch_ops: 2,
        ..config()
    };
    let storage: Arc<dyn RawStorage> = Arc::new(MemoryStorage::new());
    let keypair = Keypair::generate_ed25519();
    let others = [Keypair::generate_ed25519().public().to_peer_id(), Keypair::generate_ed25519().public().to_peer_id()];
    let unknown = |n: usize| set_on(&format!("u{n}"), &format!("t{n}"), Some(2), 1);
    let (m, peers) =
        seeing_member_over(config.clone(), Arc::new(CountBehind::default()), storage.clone(), keypair.clone(), others);
    let now = m.sim.clock().now_ms();
    for n in 0..3 {
        m.consensus.on_update(PeerId::random(), record(&peers, unknown(n), now + 1_000)).await.unwrap();
    }
    drop(m);
    let (again, peers) = seeing_member_over(config, Arc::new(CountBehind::default()), storage, keypair, others);
    let e = again.consensus.on_update(PeerId::random(), record(&peers, unknown(9), now + 1_000)).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Busy, "{e}");
}

/// Issue 21 finding 6: a batch of 1,024 operations this member is behind on leaves a small
/// stored rejection (still naming every failing operation) and queues a bounded number of
/// catch-ups, not one per operation.
#[tokio::test(start_paused = true)]
async fn a_large_rejected_batch_stores_a_small_vote_and_queues_few_catch_ups() {
    let behind = Arc::new(CountBehind::default());
    let (m, peers) = seeing_member(config(), behind.clone());
    let now = m.sim.clock().now_ms();
    let message = optimystic_core::wire::RecordMessage {
        operations: (0..1_024).map(|n| set_on(&format!("u{n:04}"), &format!("t{n}"), Some(2), 1)).collect(),
        expiration: now + 1_000,
    };
    let answer = m.consensus.on_update(peers[1], batch_record(&peers, message)).await.unwrap();
    let vote = &answer.promises[&peers[0].to_base58()];
    let reason = optimystic_core::RejectReason::parse(vote.reject_reason.as_deref().unwrap());
    let failures = reason.batch_failures().unwrap().unwrap();
    assert_eq!(failures.len(), 1_024, "every failing operation is named");
    assert!(failures.iter().all(|f| f.reason.category == optimystic_core::RejectCategory::Behind));
    for (_, bytes) in m.local.storage().list_meta("2pc/", 100).await.unwrap() {
        assert!(bytes.len() < 32 * 1_024, "a stored 2pc entry of {} bytes", bytes.len());
    }
    let reports = behind.0.load(Ordering::SeqCst);
    assert!((1..=crate::member::MAX_BEHIND_REPORTS_PER_RECORD).contains(&reports), "{reports} catch-ups queued");
}

/// Finding 8 / SPEC 4.11: once this member answered "not executed", it never executes the record.
/// The decided copy arriving just before the expiration, and waiting past it for the record's
/// locks (held here by a slow read), must not execute either: the expiry is checked again under
/// the locks that answer status queries.
#[tokio::test(start_paused = true)]
async fn not_executed_is_final() {
    let slow = Arc::new(FailingMarker::default());
    let storage: Arc<dyn RawStorage> = slow.clone();
    let m = Arc::new(member_over(storage.clone()));
    let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let peers = [m.keypair.public().to_peer_id(), a.public().to_peer_id(), b.public().to_peer_id()];
    let now = m.sim.clock().now_ms();
    let phase1 = record(&peers, insert_x(), now + 1_000);
    m.consensus.on_update(peers[1], phase1.clone()).await.unwrap();
    let mut copy = phase1.clone();
    sign(&mut copy, &a, VoteType::Approve, None);
    sign(&mut copy, &b, VoteType::Approve, None);

    // The copy is verified 10 ms before the expiration, then its entry takes 100 ms to read.
    tokio::time::sleep(Duration::from_millis(990)).await;
    slow.slow_entry_reads_ms.store(100, Ordering::SeqCst);
    let (member, late) = (m.clone(), copy.clone());
    let delivery = tokio::spawn(async move { member.consensus.on_update(peers[1], late).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let asked = status(&m, &phase1).await;
    let delivered = delivery.await.unwrap();
    assert_eq!(delivered.map(|_| ()).unwrap_err().code(), ErrorCode::Expired, "executed past its expiration");
    assert_eq!(asked["status"], json!("not-executed"));
    slow.slow_entry_reads_ms.store(0, Ordering::SeqCst);

    assert_eq!(m.consensus.on_update(peers[1], copy).await.unwrap_err().code(), ErrorCode::Expired);
    assert!(m.local.storage().latest(&x()).await.unwrap().is_none());
    assert!(m.local.storage().pending(&x(), &trx("t1")).await.unwrap().is_none());
    // The answer was persisted: a restarted member says the same.
    let keypair = m.keypair.clone();
    drop(m);
    let again = member_with(storage, keypair);
    assert_eq!(status(&again, &phase1).await["status"], json!("not-executed"));
}

/// Finding 9 / SPEC 4.11: a stale rejection stores no history, and answers are bounded.
#[tokio::test(start_paused = true)]
async fn stale_rejections_store_no_history_and_missing_is_bounded() {
    let Three { m, peers, .. } = three();
    x_at_rev_1(&m).await;
    let o = optimystic_core::MessageOptions::default();
    for rev in 2..=80u64 {
        let RepoOperation::Pend(p) = set_v(&format!("h{rev}"), Some(rev), i64::try_from(rev).unwrap()) else {
            unreachable!()
        };
        optimystic_core::Repo::pend(&m.local, &p, &o).await.unwrap();
        let RepoOperation::Commit(c) = commit_op(&format!("h{rev}"), rev) else { unreachable!() };
        optimystic_core::Repo::commit(&m.local, &c, &o).await.unwrap();
    }
    let now = m.sim.clock().now_ms();
    let stale = m.consensus.on_update(peers[1], record(&peers, set_v("old", Some(2), 0), now + 1_000)).await.unwrap();
    let vote = &stale.promises[&peers[0].to_base58()];
    assert!(vote.reject_reason.as_deref().unwrap().starts_with("stale: "), "{vote:?}");
    let missing = stale.extra[RESULT_FIELD]["missing"].as_array().unwrap();
    assert_eq!(missing.len() as u64, optimystic_core::repo::MAX_MISSING_REVISIONS, "the newest revisions only");
    assert_eq!(missing.last().unwrap()["rev"], json!(80));
    for (_, bytes) in m.local.storage().list_meta("2pc/", 100).await.unwrap() {
        assert!(bytes.len() < 1_024, "a stored 2pc entry carries history: {} bytes", bytes.len());
    }
}

/// Finding 3 / SPEC 2.1: on a member a read with a context never writes storage.
#[tokio::test]
async fn a_read_on_a_member_never_writes() {
    let m = member();
    x_at_rev_1(&m).await;
    let o = optimystic_core::MessageOptions::default();
    let RepoOperation::Pend(p) = set_v("t2", Some(2), 2) else { unreachable!() };
    optimystic_core::Repo::pend(&m.local, &p, &o).await.unwrap();
    let reads = m.local.with_read_promotion(optimystic_core::ReadPromotion::AnswerOnly);
    let gets = optimystic_core::model::BlockGets {
        block_ids: vec![x()],
        context: Some(optimystic_core::model::TrxContext {
            committed: vec![optimystic_core::TrxRev { trx_id: trx("t2"), rev: 2 }],
            rev: 2,
            trx_id: None,
        }),
        read_mode: None,
    };
    let answer = optimystic_core::Repo::get(&reads, &gets, &o).await.unwrap();
    assert_eq!(answer[&x()].block.as_ref().unwrap().fields["v"], json!(2), "the reader's context is in its answer");
    assert_eq!(m.local.storage().latest(&x()).await.unwrap().map(|l| l.rev), Some(1), "nothing committed by a read");
    assert!(m.local.storage().pending(&x(), &trx("t2")).await.unwrap().is_some());
    assert_eq!(m.consensus.read_promotion(), optimystic_core::ReadPromotion::AnswerOnly);
}

/// Serves one canned sync answer per request kind.
struct CannedSync {
    latest: Value,
    page: Value,
}

impl optimystic_testkit::sim::SimHandler for CannedSync {
    fn handle(
        &self,
        _from: PeerId,
        _protocol: optimystic_core::network::ProtocolKind,
        request: Value,
    ) -> futures::future::BoxFuture<'static, Result<Value, optimystic_core::RepoError>> {
        let answer = if request["op"] == json!("latest") { self.latest.clone() } else { self.page.clone() };
        Box::pin(async move { Ok(answer) })
    }
}

/// Finding 2 / SPEC 4.10: catch-up applies nothing a single peer says on its own; verified
/// evidence is applied.
#[tokio::test(start_paused = true)]
async fn catch_up_applies_only_verified_revisions() {
    let Three { m, a, b, peers } = three();
    x_at_rev_1(&m).await;
    let forger = Keypair::generate_ed25519().public().to_peer_id();
    let view = [peers[0], forger, peers[2]];
    let set = |v: i64| optimystic_core::Transform {
        updates: Some(vec![optimystic_core::BlockOperation::set("v", json!(v))]),
        ..optimystic_core::Transform::default()
    };
    let now = m.sim.clock().now_ms();
    // Evidence signed by keys the forger made up (its own peer set) for an invented revision.
    let (f1, f2) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let fake_peers = [forger, f1.public().to_peer_id(), f2.public().to_peer_id()];
    let forged = json!({
        "pend": decided(&fake_peers, set_v("forged", Some(2), 666), now + 1_000, &f1, &f2).to_value(),
        "commit": decided(&fake_peers, commit_op("forged", 2), now + 1_000, &f1, &f2).to_value(),
    });
    for evidence in [Value::Null, forged] {
        let mut entry = json!({"trxId": "forged", "rev": 2, "transform": set(666)});
        if !evidence.is_null() {
            entry["evidence"] = evidence;
        }
        m.sim.register(
            forger,
            Arc::new(CannedSync {
                latest: json!({"latest": {"x": {"trxId": "forged", "rev": 1_000_000}}}),
                page: json!({"latest": {"trxId": "forged", "rev": 1_000_000}, "entries": [entry], "more": false}),
            }),
        );
        let catch_up = optimystic_core::sync::CatchUp::new(
            m.sim.network(peers[0]),
            m.local.clone(),
            Arc::new(Seen(view.to_vec())),
            Duration::from_millis(500),
        );
        assert_eq!(catch_up.catch_up_in(&x(), &view).await.unwrap(), 0);
        assert_eq!(m.local.storage().latest(&x()).await.unwrap().map(|l| l.rev), Some(1), "nothing invented applied");
    }

    // Genuine evidence (decided by the real cluster) is applied, and kept.
    let genuine = json!({
        "pend": decided(&peers, set_v("t2", Some(2), 2), now + 1_000, &a, &b).to_value(),
        "commit": decided(&peers, commit_op("t2", 2), now + 1_000, &a, &b).to_value(),
    });
    m.sim.register(peers[1], Arc::new(CannedSync {
        latest: json!({"latest": {"x": {"trxId": "t2", "rev": 2}}}),
        page: json!({"latest": {"trxId": "t2", "rev": 2}, "entries": [{"trxId": "t2", "rev": 2, "transform": set(2), "evidence": genuine}], "more": false}),
    }));
    let catch_up = optimystic_core::sync::CatchUp::new(
        m.sim.network(peers[0]),
        m.local.clone(),
        Arc::new(Seen(peers.to_vec())),
        Duration::from_millis(500),
    );
    assert_eq!(catch_up.catch_up_in(&x(), &peers).await.unwrap(), 1);
    assert_eq!(m.local.latest_value(&x()).await.unwrap().1.unwrap().fields["v"], json!(2));
    assert!(m.local.evidence(&x(), 2).await.unwrap().is_some());
}

// ---------------------------------------------------------------------------------------------
// Bounded recovery, signed renounces and equivocation (issue 21; SPEC 4.5).

/// How a record's third peer answers recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Third {
    /// A lying member: "pending", forever.
    Liar,
    /// A member that never answers.
    Silent,
    /// A peer this member saw once, since gone (nothing serves its id).
    Gone,
}

/// Answers every request as `Third` says.
struct ThirdPeer(Third);

impl optimystic_testkit::sim::SimHandler for ThirdPeer {
    fn handle(
        &self,
        _from: PeerId,
        _protocol: optimystic_core::network::ProtocolKind,
        request: Value,
    ) -> futures::future::BoxFuture<'static, Result<Value, optimystic_core::RepoError>> {
        let hash = request.pointer("/record/messageHash").cloned().unwrap_or(Value::Null);
        match self.0 {
            Third::Silent => Box::pin(futures::future::pending()),
            _ => Box::pin(async move { Ok(json!({"messageHash": hash, "status": "pending"})) }),
        }
    }
}

fn insert_on(id: &str, trx_id: &str) -> RepoOperation {
    RepoOperation::Pend(insert_pend(id, &trx(trx_id)))
}

/// An honest member with `keypair` on the simulated network of `m`, serving the cluster protocol.
fn honest_peer(m: &Member, keypair: Keypair) -> Arc<MajorityConsensus> {
    let a = keypair.public().to_peer_id();
    let local = StorageRepo::new(Arc::new(MemoryStorage::new()));
    let deps = MajorityDeps {
        keypair,
        network: m.sim.network(a),
        local: local.clone(),
        key_network: None,
        clock: m.sim.clock(),
        behind: None,
    };
    let consensus = Arc::new(MajorityConsensus::new(config(), deps).unwrap());
    m.sim.register(a, Arc::new(optimystic_testkit::sim::NodeHandler::new(consensus.clone(), local)));
    consensus
}

/// Issue 21 finding 3 / SPEC 4.5: a record's peer set includes E, which answers recovery
/// "pending" forever, never answers, or is a peer seen once and gone; senders use throw-away ids.
/// Until `recovery_bound_ms` past expiration the reservations hold (a peer that cannot answer
/// may have executed the record); after it, this member's renounce and the honest peer's signed
/// one (a majority) release every reservation, honest records on those blocks are approved, and
/// nothing reloads after a restart.
#[tokio::test(start_paused = true)]
async fn one_peer_cannot_pin_reservations_forever() {
    for third in [Third::Liar, Third::Silent, Third::Gone] {
        let storage: Arc<dyn RawStorage> = Arc::new(MemoryStorage::new());
        let keypair = Keypair::generate_ed25519();
        let me = keypair.public().to_peer_id();
        let e = Keypair::generate_ed25519().public().to_peer_id();
        let bounded = MajorityConfig { grace_ms: 100, ..MajorityConfig::default() };
        assert_eq!(bounded.recovery_bound_ms, 600_000);
        let a_keypair = Keypair::generate_ed25519();
        let a = a_keypair.public().to_peer_id();
        let seen: Option<Arc<dyn optimystic_core::keynet::KeyNetwork>> = match third {
            Third::Gone => Some(Arc::new(Seen(vec![me, a, e]))),
            _ => None,
        };
        let m = member_configured(storage.clone(), keypair.clone(), bounded.clone(), seen.clone());
        let honest = honest_peer(&m, a_keypair);
        if third != Third::Gone {
            m.sim.register(e, Arc::new(ThirdPeer(third)));
        }
        let peers = [me, a, e];
        let now = m.sim.clock().now_ms();
        let ids: Vec<String> = (0..6).map(|i| format!("p{i}")).collect();
        let mut records = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let r = record(&peers, insert_on(id, &format!("spam-{id}")), now + 1_000);
            let voted = m.consensus.on_update(PeerId::random(), r.clone()).await.unwrap();
            assert!(voted.promises[&me.to_base58()].is_approve());
            if i % 2 == 0 {
                // The honest peer promised some of them too; it renounces them at recovery.
                honest.on_update(PeerId::random(), r.clone()).await.unwrap();
            }
            records.push(r);
        }
        assert_eq!(m.consensus.live_reservations(), 6);

        // Before the bound the reservations hold: E may have executed the records.
        tokio::time::sleep(Duration::from_millis(5 * 60 * 1_000)).await;
        assert_eq!(m.consensus.live_reservations(), 6, "{third:?}: released before the bound");
        let later = m.sim.clock().now_ms();
        let blocked =
            m.consensus.on_update(a, record(&peers, insert_on("p0", "honest-0"), later + 1_000)).await.unwrap();
        assert!(blocked.promises[&me.to_base58()].reject_reason.as_deref().unwrap().starts_with("conflict: "));

        // Past the bound (and a recovery round) every reservation is released; a virtual day
        // later none came back. (The honest peer, which cannot reach this member, stops its
        // own recovery rounds meanwhile: they would only cost the test time.)
        tokio::time::sleep(Duration::from_millis(6 * 60 * 1_000)).await;
        assert_eq!(m.consensus.live_reservations(), 0, "{third:?}: reservations still pinned");
        Consensus::shutdown(honest.as_ref());
        tokio::time::sleep(Duration::from_millis(24 * 60 * 60 * 1_000)).await;
        assert_eq!(m.consensus.live_reservations(), 0);
        for r in &records {
            assert_eq!(m.consensus.status_of(r).await.unwrap(), Some(RecordStatus::Aborted), "{third:?}");
            let answer = status(&m, r).await;
            assert_eq!(answer["status"], json!("aborted"));
            let signature = answer[RENOUNCE_FIELD].as_str().unwrap();
            verify_renounce(&me, &r.message_hash, signature).unwrap();
        }

        // Nothing reloads after a restart, and honest records are approved.
        drop(m);
        let restarted = member_configured(storage.clone(), keypair.clone(), bounded.clone(), seen.clone());
        restarted.consensus.start().await.unwrap();
        assert_eq!(restarted.consensus.live_reservations(), 0, "{third:?}: reloaded after a restart");
        let now = restarted.sim.clock().now_ms();
        for id in &ids {
            let honest_record = record(&peers, insert_on(id, &format!("honest-{id}")), now + 1_000);
            let voted = restarted.consensus.on_update(a, honest_record).await.unwrap();
            assert!(voted.promises[&me.to_base58()].is_approve(), "{third:?}: {:?}", voted.promises);
        }
    }
}

/// Answers the requests it gets with `answers` in turn, the last one again and again.
struct Scripted(std::sync::Mutex<Vec<Value>>);

impl optimystic_testkit::sim::SimHandler for Scripted {
    fn handle(
        &self,
        _from: PeerId,
        _protocol: optimystic_core::network::ProtocolKind,
        _request: Value,
    ) -> futures::future::BoxFuture<'static, Result<Value, optimystic_core::RepoError>> {
        let mut answers = self.0.lock().unwrap();
        let answer = if answers.len() > 1 { answers.remove(0) } else { answers[0].clone() };
        Box::pin(async move { Ok(answer) })
    }
}

/// SPEC 4.5: E renounces a record to this member ("not executed", signed) and signs an approving
/// commit vote on it, which a copy from A shows: E is proven faulty. The proof is persisted and
/// counted, the record (decided without E) executes, and afterwards E's promises count for
/// nothing: a record only E and A approved is not decided here.
#[tokio::test(start_paused = true)]
async fn a_renounce_and_an_approving_commit_vote_prove_a_peer_faulty() {
    let storage: Arc<dyn RawStorage> = Arc::new(MemoryStorage::new());
    let m = member_over(storage.clone());
    let (a, e) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let me = m.keypair.public().to_peer_id();
    let peers = [me, a.public().to_peer_id(), e.public().to_peer_id()];
    let now = m.sim.clock().now_ms();
    let phase1 = record(&peers, insert_x(), now + 1_000);
    let mut copy = m.consensus.on_update(peers[1], phase1.clone()).await.unwrap();
    sign(&mut copy, &a, VoteType::Approve, None);
    sign(&mut copy, &e, VoteType::Approve, None);
    for keypair in [&a, &e] {
        let vote = copy.sign_commit(keypair, VoteType::Approve, None).unwrap();
        copy.commits.insert(keypair.public().to_peer_id().to_base58(), vote);
    }
    let hash = phase1.message_hash.clone();
    let renounce = sign_renounce(&e, &hash).unwrap();
    m.sim.register(
        peers[2],
        Arc::new(Scripted(std::sync::Mutex::new(vec![
            json!({"messageHash": hash, "status": "not-executed", "renounce": renounce}),
        ]))),
    );
    // A answers "pending" to the first round and shows its executed copy to the next.
    m.sim.register(
        peers[1],
        Arc::new(Scripted(std::sync::Mutex::new(vec![
            json!({"messageHash": hash, "status": "pending"}),
            json!({"messageHash": hash, "status": "executed", "record": copy.to_value()}),
        ]))),
    );
    m.consensus.wait_idle().await;
    assert!(m.consensus.is_faulty(&peers[2]), "E signed a renounce and an approving commit vote");
    assert_eq!(m.consensus.faulty_peers().len(), 1);
    assert!(!m.consensus.is_faulty(&peers[1]));
    assert_eq!(m.consensus.status_of(&phase1).await.unwrap(), Some(RecordStatus::Executed), "decided without E");
    let proofs = storage.list_meta("2pc/faulty/", 10).await.unwrap();
    assert_eq!(proofs.len(), 1);
    let proof: Value = serde_json::from_slice(&proofs[0].1).unwrap();
    assert_eq!(proof["renounce"], json!(renounce));
    let witness = ClusterRecord::from_value(proof["record"].clone()).unwrap();
    witness.verify(None).unwrap();
    assert!(witness.commits[&peers[2].to_base58()].is_approve());

    // E's signatures count for nothing now, here and after a restart.
    let keypair = m.keypair.clone();
    drop(m);
    let m = member_with(storage, keypair);
    m.consensus.start().await.unwrap();
    assert!(m.consensus.is_faulty(&peers[2]), "the proof is persisted");
    let y = Block::new(BlockId::new("y").unwrap(), "t", "c");
    let insert_y = RepoOperation::Pend(PendRequest {
        trx_id: trx("ty"),
        rev: Some(1),
        transforms: Transforms { inserts: BTreeMap::from([(BlockId::new("y").unwrap(), y)]), ..Transforms::default() },
        policy: PendPolicy::Continue,
    });
    let now = m.sim.clock().now_ms();
    let with_e = decided(&peers, insert_y, now + 1_000, &a, &e);
    let reply = m.consensus.on_update(peers[1], with_e.clone()).await.unwrap();
    assert!(!reply.commits.contains_key(&me.to_base58()), "decided only with a faulty peer's promise");
    assert_eq!(m.consensus.status_of(&with_e).await.unwrap(), Some(RecordStatus::Promised));
}

/// SPEC 4.5: only renounces that verify, by the peer that answers, count towards the bound. E
/// answers "not executed" with a renounce signed by another key, A never answers: this member's
/// own renounce alone is no majority, so the reservation holds (A may have executed the record).
#[tokio::test(start_paused = true)]
async fn a_renounce_that_does_not_verify_counts_for_nothing() {
    let Three { m, a, b, peers } = three();
    let now = m.sim.clock().now_ms();
    let phase1 = record(&peers, insert_x(), now + 1_000);
    m.consensus.on_update(peers[1], phase1.clone()).await.unwrap();
    let forged = sign_renounce(&a, &phase1.message_hash).unwrap();
    m.sim.register(peers[1], Arc::new(ThirdPeer(Third::Silent)));
    m.sim.register(
        peers[2],
        Arc::new(Scripted(std::sync::Mutex::new(vec![
            json!({"messageHash": phase1.message_hash, "status": "not-executed", "renounce": forged}),
        ]))),
    );
    tokio::time::sleep(Duration::from_millis(60 * 60 * 1_000)).await;
    assert_eq!(m.consensus.live_reservations(), 1, "released on a renounce that does not verify");
    assert_eq!(m.consensus.status_of(&phase1).await.unwrap(), Some(RecordStatus::Promised));
    // B's genuine renounce makes the majority.
    let genuine = sign_renounce(&b, &phase1.message_hash).unwrap();
    m.sim.register(
        peers[2],
        Arc::new(Scripted(std::sync::Mutex::new(vec![
            json!({"messageHash": phase1.message_hash, "status": "not-executed", "renounce": genuine}),
        ]))),
    );
    tokio::time::sleep(Duration::from_millis(config().recovery_backoff_max_ms * 2)).await;
    assert_eq!(m.consensus.live_reservations(), 0);
    assert_eq!(m.consensus.status_of(&phase1).await.unwrap(), Some(RecordStatus::Aborted));
}

/// SPEC 4.5: a reservation is aborted once this member holds, with evidence, a revision at or
/// above the record's on every block it names, whatever its peers answer (here: nothing).
#[tokio::test(start_paused = true)]
async fn a_reservation_passed_by_a_proven_revision_is_aborted() {
    let Three { m, a, b, peers } = three();
    x_at_rev_1(&m).await;
    m.sim.register(peers[1], Arc::new(ThirdPeer(Third::Silent)));
    m.sim.register(peers[2], Arc::new(ThirdPeer(Third::Liar)));
    let now = m.sim.clock().now_ms();
    let pend = record(&peers, set_v("t2", Some(2), 2), now + 1_000);
    assert!(m.consensus.on_update(peers[1], pend.clone()).await.unwrap().promises[&peers[0].to_base58()].is_approve());
    // Catch-up brings revision 2 of another trx, with its evidence.
    let evidence = optimystic_core::evidence::Evidence {
        pend: Some(decided(&peers, set_v("u2", Some(2), 5), now + 1_000, &a, &b).to_value()),
        commit: decided(&peers, commit_op("u2", 2), now + 1_000, &a, &b).to_value(),
    };
    let set5 = optimystic_core::Transform {
        updates: Some(vec![optimystic_core::BlockOperation::set("v", json!(5))]),
        ..optimystic_core::Transform::default()
    };
    let u2 = optimystic_core::TrxRev { trx_id: trx("u2"), rev: 2 };
    assert!(m.local.apply_replica(&x(), &u2, &set5, Some(&evidence)).await.unwrap());
    // Released by the first recovery round, long before the bound.
    tokio::time::sleep(Duration::from_millis(1_000 + config().grace_ms + 100)).await;
    assert_eq!(m.consensus.live_reservations(), 0);
    assert_eq!(m.consensus.status_of(&pend).await.unwrap(), Some(RecordStatus::Aborted));
}

// ---------------------------------------------------------------------------------------------
// Batched records (SPEC 4.14), through a coordinator and three members on the simulated network.

/// Three members on one simulated network, each serving the cluster protocol; node 0 coordinates.
struct Trio {
    sim: SimNet,
    nodes: Vec<(Arc<MajorityConsensus>, StorageRepo)>,
    peers: ClusterPeers,
    /// The phase-1 records the coordinator sent (one per messageHash), in order.
    records: Arc<std::sync::Mutex<Vec<ClusterRecord>>>,
    /// The promise votes members answered with.
    replies: Arc<std::sync::Mutex<Vec<ClusterRecord>>>,
}

fn trio(config: MajorityConfig, sim_config: SimConfig) -> Trio {
    let sim = SimNet::new(7, sim_config);
    let mut nodes = Vec::new();
    let mut peers = ClusterPeers::new();
    for _ in 0..3 {
        let keypair = Keypair::generate_ed25519();
        let me = keypair.public().to_peer_id();
        let local = StorageRepo::new(Arc::new(MemoryStorage::new()));
        let deps = MajorityDeps {
            keypair,
            network: sim.network(me),
            local: local.clone(),
            key_network: None,
            clock: sim.clock(),
            behind: None,
        };
        let consensus = Arc::new(MajorityConsensus::new(config.clone(), deps).unwrap());
        let handler = optimystic_testkit::sim::NodeHandler::new(consensus.clone(), local.clone());
        sim.register(me, Arc::new(handler));
        peers.insert(me, PeerInfo::default());
        nodes.push((consensus, local));
    }
    let records = Arc::new(std::sync::Mutex::new(Vec::<ClusterRecord>::new()));
    let replies = Arc::new(std::sync::Mutex::new(Vec::<ClusterRecord>::new()));
    let (seen, answered) = (records.clone(), replies.clone());
    sim.set_filter(Some(Arc::new(move |e: &Envelope<'_>| {
        if e.protocol == optimystic_core::network::ProtocolKind::Cluster
            && let Some(record) =
                e.body.get("record").or(Some(e.body)).and_then(|r| ClusterRecord::from_value(r.clone()).ok())
        {
            if e.direction == optimystic_testkit::sim::Direction::Request && record.promises.is_empty() {
                let mut seen = seen.lock().unwrap();
                if seen.iter().all(|r| r.message_hash != record.message_hash) {
                    seen.push(record);
                }
            } else if e.direction == optimystic_testkit::sim::Direction::Response && record.commits.is_empty() {
                answered.lock().unwrap().push(record);
            }
        }
        Verdict::Deliver
    })));
    Trio { sim, nodes, peers, records, replies }
}

impl Trio {
    fn coordinator(&self) -> &MajorityConsensus {
        &self.nodes[0].0
    }

    /// Puts `block` at revision 1 (trx `init-<block>`) on every member, directly in storage.
    async fn seed(&self, block: &str) {
        let o = optimystic_core::MessageOptions::default();
        for (_, local) in &self.nodes {
            optimystic_core::Repo::pend(local, &insert_pend(block, &trx(&format!("init-{block}"))), &o).await.unwrap();
            let RepoOperation::Commit(commit) = commit_on(block, &format!("init-{block}"), 1) else { unreachable!() };
            assert!(optimystic_core::Repo::commit(local, &commit, &o).await.unwrap().is_success());
        }
    }

    async fn run(&self, operation: RepoOperation) -> Result<RepoResponse, RepoError> {
        let now = self.sim.clock().now_ms();
        self.coordinator().execute(&self.peers, &RepoMessage::new(operation, now + 5_000)).await
    }

    /// How many operations each record the coordinator sent carried, in order.
    fn sizes(&self) -> Vec<usize> {
        self.records.lock().unwrap().iter().map(|r| r.message["operations"].as_array().map_or(0, Vec::len)).collect()
    }

    async fn wait_idle(&self) {
        self.sim.wait_quiet().await;
        for (consensus, _) in &self.nodes {
            consensus.wait_idle().await;
        }
    }
}

fn block(id: &str) -> BlockId {
    BlockId::new(id).unwrap()
}

fn insert_pend(block_id: &str, trx_id: &TrxId) -> PendRequest {
    let b = Block::new(block(block_id), "t", "c").with_field("v", json!(0));
    PendRequest {
        trx_id: trx_id.clone(),
        rev: Some(1),
        transforms: Transforms { inserts: BTreeMap::from([(block(block_id), b)]), ..Transforms::default() },
        policy: PendPolicy::Continue,
    }
}

fn set_on(block_id: &str, trx_id: &str, rev: Option<u64>, v: i64) -> RepoOperation {
    RepoOperation::Pend(PendRequest {
        trx_id: trx(trx_id),
        rev,
        transforms: Transforms::single(
            &block(block_id),
            &optimystic_core::Transform {
                updates: Some(vec![optimystic_core::BlockOperation::set("v", json!(v))]),
                ..optimystic_core::Transform::default()
            },
        ),
        policy: PendPolicy::Continue,
    })
}

fn commit_on(block_id: &str, trx_id: &str, rev: u64) -> RepoOperation {
    RepoOperation::Commit(CommitRequest {
        trx_id: trx(trx_id),
        block_ids: vec![block(block_id)],
        rev,
        tail_id: block(block_id),
        header_id: None,
    })
}

fn pended(answer: &Result<RepoResponse, RepoError>) -> bool {
    matches!(answer, Ok(RepoResponse::Pend(PendResult::Success(_))))
}

fn committed(answer: &Result<RepoResponse, RepoError>) -> bool {
    matches!(answer, Ok(RepoResponse::Commit(CommitResult::Success(_))))
}

/// SPEC 4.14: an operation arriving at an idle lane goes out at once, alone, in a record that is
/// exactly the repo message (byte-compatible with records before batching), and takes exactly as
/// long as with batching off.
#[tokio::test(start_paused = true)]
async fn a_lone_operation_goes_alone_at_once() {
    let fixed = SimConfig { min_delay_ms: 3, max_delay_ms: 3, ..SimConfig::default() };
    let mut took = Vec::new();
    for max_batch_ops in [64, 1] {
        let t = trio(MajorityConfig { max_batch_ops, ..config() }, fixed);
        t.seed("x").await;
        let now = t.sim.clock().now_ms();
        let started = tokio::time::Instant::now();
        let message = RepoMessage::new(set_on("x", "lone", Some(2), 2), now + 1_000);
        assert!(pended(&t.coordinator().execute(&t.peers, &message).await));
        took.push(started.elapsed());
        let sent = t.records.lock().unwrap().clone();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            sent[0].message,
            serde_json::to_value(&message).unwrap(),
            "a record of one operation is the repo message"
        );
    }
    assert_eq!(took[0], took[1], "no waiting for company: {took:?}");
    assert!(took[0] <= Duration::from_millis(4 * 3), "two round trips: {took:?}");
}

/// SPEC 4.14: operations queued while a record is in flight go out together in the next record,
/// at most `max_batch_ops` at a time.
#[tokio::test(start_paused = true)]
async fn queued_operations_share_records_of_at_most_max_batch_ops() {
    let t = trio(MajorityConfig { max_batch_ops: 2, ..config() }, SimConfig::default());
    let ids = ["a", "b", "c", "d", "e"];
    let answers = futures::future::join_all(
        ids.iter().map(|id| t.run(RepoOperation::Pend(insert_pend(id, &trx(&format!("i-{id}")))))),
    )
    .await;
    assert!(answers.iter().all(pended), "{answers:?}");
    assert_eq!(t.sizes(), vec![1, 2, 2], "the first alone at once, the others queued meanwhile");
    // A record that names more than a member accepts is refused as a whole.
    let peers: Vec<PeerId> = t.peers.keys().copied().collect();
    let now = t.sim.clock().now_ms();
    let too_many: Vec<RepoOperation> = (0..=optimystic_core::wire::MAX_RECORD_OPERATIONS)
        .map(|i| RepoOperation::Pend(insert_pend(&format!("n{i}"), &trx(&format!("n{i}")))))
        .collect();
    let message = optimystic_core::wire::RecordMessage { operations: too_many, expiration: now + 1_000 };
    let huge = batch_record(&peers, message);
    let e = t.nodes[1].0.on_update(peers[0], huge).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::BadRequest);
}

fn batch_record(peers: &[PeerId], message: optimystic_core::wire::RecordMessage) -> ClusterRecord {
    let peers = peers.iter().map(|p| (p.to_base58(), ClusterPeer::new(p, vec![]).unwrap())).collect();
    ClusterRecord::new(peers, serde_json::to_value(message).unwrap())
}

/// SPEC 4.14: a batch's block sets are pairwise disjoint: an operation naming a block already in
/// the batch waits for the next record, and a member refuses a record naming a block twice.
#[tokio::test(start_paused = true)]
async fn a_batch_names_each_block_once() {
    let t = trio(config(), SimConfig::default());
    for id in ["w", "x", "y"] {
        t.seed(id).await;
    }
    // The first goes alone at once; the others queue while it is in flight.
    let (lone, first, second, other) = futures::join!(
        t.run(set_on("w", "t0", None, 0)),
        t.run(set_on("x", "t1", None, 1)),
        t.run(set_on("x", "t2", None, 2)),
        t.run(set_on("y", "t3", None, 3)),
    );
    assert!(pended(&lone) && pended(&first) && pended(&second) && pended(&other), "{first:?} {second:?} {other:?}");
    let sent = t.records.lock().unwrap().clone();
    let trxs = |r: &ClusterRecord| -> Vec<String> {
        r.message["operations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|op| op["pend"]["trxId"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(sent.iter().map(trxs).collect::<Vec<_>>(), vec![vec!["t0"], vec!["t1", "t3"], vec!["t2"]]);

    let peers: Vec<PeerId> = t.peers.keys().copied().collect();
    let now = t.sim.clock().now_ms();
    let message = optimystic_core::wire::RecordMessage {
        operations: vec![set_on("x", "u1", None, 1), set_on("y", "u2", None, 1), set_on("x", "u3", None, 1)],
        expiration: now + 1_000,
    };
    let e = t.nodes[1].0.on_update(peers[0], batch_record(&peers, message)).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::BadRequest);
    assert!(e.to_string().contains("both name block x"), "{e}");
}

/// SPEC 4.14: a batch with one stale operation is rejected by the members, naming it; its client
/// gets its own `StaleFailure` (with its block's missing revisions) and the other operations
/// commit after a re-run in a new record. Each revision committed in a batch keeps the batch as
/// its evidence, which verifies for that revision.
#[tokio::test(start_paused = true)]
async fn a_stale_operation_is_answered_and_the_rest_of_its_batch_reruns() {
    let t = trio(config(), SimConfig::default());
    for id in ["w", "x", "y", "z"] {
        t.seed(id).await;
    }
    let (w, x, y, z) = futures::join!(
        t.run(set_on("w", "tw", Some(2), 2)),
        t.run(set_on("x", "tx", Some(2), 2)),
        t.run(set_on("y", "ty", Some(1), 2)),
        t.run(set_on("z", "tz", Some(2), 2)),
    );
    assert!(pended(&w) && pended(&x) && pended(&z), "{x:?} {z:?}");
    let Ok(RepoResponse::Pend(PendResult::Stale(stale))) = &y else { panic!("expected a StaleFailure, got {y:?}") };
    let missing = stale.missing.as_ref().unwrap();
    assert_eq!((missing.len(), missing[0].rev, missing[0].trx_id.as_str()), (1, 1, "init-y"));
    assert_eq!(t.sizes(), vec![1, 3, 2], "the lone first, the batch, then the re-run of the others");
    let reasons: Vec<String> = t
        .replies
        .lock()
        .unwrap()
        .iter()
        .flat_map(|r| r.promises.values().filter_map(|v| v.reject_reason.clone()).collect::<Vec<_>>())
        .collect();
    assert!(!reasons.is_empty() && reasons.iter().all(|r| r.starts_with("batch: [[1,\"stale: ")), "{reasons:?}");

    let (cw, cx, cz) =
        futures::join!(t.run(commit_on("w", "tw", 2)), t.run(commit_on("x", "tx", 2)), t.run(commit_on("z", "tz", 2)));
    assert!(committed(&cw) && committed(&cx) && committed(&cz), "{cx:?} {cz:?}");
    t.wait_idle().await;
    let view: Vec<PeerId> = t.peers.keys().copied().collect();
    for (_, local) in &t.nodes {
        for id in ["x", "z"] {
            assert_eq!(local.latest_value(&block(id)).await.unwrap().0.map(|l| l.rev), Some(2));
            let evidence = local.evidence(&block(id), 2).await.unwrap().unwrap();
            assert_eq!(evidence.commit["message"]["operations"].as_array().unwrap().len(), 2, "committed in one batch");
            let trx_rev = optimystic_core::TrxRev { trx_id: trx(&format!("t{id}")), rev: 2 };
            let set = optimystic_core::Transform {
                updates: Some(vec![optimystic_core::BlockOperation::set("v", json!(2))]),
                ..optimystic_core::Transform::default()
            };
            optimystic_core::evidence::verify(Some(&evidence), &block(id), &trx_rev, &set, &view).unwrap();
        }
        assert_eq!(local.latest_value(&block("y")).await.unwrap().0.map(|l| l.rev), Some(1));
    }
}

/// SPEC 4.14: a batch rejected for a conflict on one index: that operation's client gets
/// `consensus-failed` (retryable), the others go through in a new record.
#[tokio::test(start_paused = true)]
async fn a_conflict_on_one_operation_fails_it_alone() {
    let t = trio(config(), SimConfig::default());
    for id in ["w", "x", "y", "z"] {
        t.seed(id).await;
    }
    // Another record holds a reservation on y at every member.
    let peers: Vec<PeerId> = t.peers.keys().copied().collect();
    let now = t.sim.clock().now_ms();
    let blocker = record(&peers, set_on("y", "blocker", Some(2), 9), now + 1_000);
    for (consensus, _) in &t.nodes {
        assert!(
            consensus.on_update(peers[1], blocker.clone()).await.unwrap().promises.values().all(|v| v.is_approve())
        );
    }
    let (w, x, y, z) = futures::join!(
        t.run(set_on("w", "tw", Some(2), 2)),
        t.run(set_on("x", "tx", Some(2), 2)),
        t.run(set_on("y", "ty", Some(2), 2)),
        t.run(set_on("z", "tz", Some(2), 2)),
    );
    assert!(pended(&w) && pended(&x) && pended(&z), "{x:?} {z:?}");
    assert!(matches!(&y, Err(RepoError::ConsensusFailed(_))), "{y:?}");
    assert_eq!(t.sizes(), vec![1, 3, 2]);
    let batch_hash = t.records.lock().unwrap()[1].message_hash.clone();
    let reasons: Vec<String> = t
        .replies
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.message_hash == batch_hash)
        .flat_map(|r| r.promises.values().filter_map(|v| v.reject_reason.clone()).collect::<Vec<_>>())
        .collect();
    let expected = format!("batch: [[1,\"conflict: block y is reserved by {}\"]]", blocker.message_hash);
    assert!(!reasons.is_empty() && reasons.iter().all(|r| *r == expected), "{reasons:?}");
    for (_, local) in &t.nodes {
        assert!(local.storage().pending(&block("y"), &trx("ty")).await.unwrap().is_none());
        assert!(local.storage().pending(&block("x"), &trx("tx")).await.unwrap().is_some());
    }
}

/// A decided batch whose operation cannot apply on this member (here: stale) applies the others,
/// keeps each result in order, and signs a reject naming that operation.
#[tokio::test(start_paused = true)]
async fn a_decided_batch_reports_each_operation() {
    let Three { m, a, b, peers } = three();
    x_at_rev_1(&m).await;
    let o = optimystic_core::MessageOptions::default();
    let RepoOperation::Pend(p9) = set_v("t9", None, 9) else { unreachable!() };
    optimystic_core::Repo::pend(&m.local, &p9, &o).await.unwrap();
    let now = m.sim.clock().now_ms();
    let message = optimystic_core::wire::RecordMessage {
        operations: vec![RepoOperation::Pend(insert_pend("w", &trx("tw"))), commit_op("t9", 1)],
        expiration: now + 1_000,
    };
    let mut batch = batch_record(&peers, message);
    sign(&mut batch, &a, VoteType::Approve, None);
    sign(&mut batch, &b, VoteType::Approve, None);
    let reply = m.consensus.on_update(peers[1], batch.clone()).await.unwrap();
    let vote = &reply.commits[&peers[0].to_base58()];
    assert_eq!(vote.r#type, VoteType::Reject);
    assert!(vote.reject_reason.as_deref().unwrap().starts_with("batch: [[1,\"stale: "), "{vote:?}");
    let results = reply.extra[RESULT_FIELD].as_array().unwrap();
    assert_eq!(results[0]["success"], json!(true));
    assert_eq!(results[1]["success"], json!(false));
    assert!(m.local.storage().pending(&block("w"), &trx("tw")).await.unwrap().is_some(), "the other operation applied");
    assert_eq!(m.consensus.status_of(&batch).await.unwrap(), Some(RecordStatus::Executed));
    let again = m.consensus.on_update(peers[1], batch).await.unwrap();
    assert_eq!(again.extra[RESULT_FIELD], reply.extra[RESULT_FIELD], "the results are kept in the marker");
}

// Issue 21: the write path's answers and proof (SPEC 4.4 final record, vote gossip and the
// client's answer; SPEC 4.20 write-path custody).

/// A node's cluster handler with faults of its own: it answers after `delay_ms` of virtual time,
/// and with `forge` it lies about its results (an approving commit vote next to a stale result).
struct Tweaked {
    honest: optimystic_testkit::sim::NodeHandler,
    delay_ms: Arc<AtomicUsize>,
    forge: bool,
}

impl optimystic_testkit::sim::SimHandler for Tweaked {
    fn handle(
        &self,
        from: PeerId,
        protocol: optimystic_core::network::ProtocolKind,
        request: Value,
    ) -> futures::future::BoxFuture<'static, Result<Value, RepoError>> {
        let honest = self.honest.clone();
        let delay = Duration::from_millis(self.delay_ms.load(Ordering::SeqCst) as u64);
        let forge = self.forge;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let mut answer = honest.handle(from, protocol, request).await?;
            if forge
                && let Some(commits) = answer.get("commits").and_then(Value::as_object)
                && commits.values().any(|v| v["type"] == json!("approve"))
            {
                answer["result"] = json!({"success": false, "reason": "stale revision"});
            }
            Ok(answer)
        })
    }

    fn on_crash(&self) {
        self.honest.on_crash();
    }
}

/// `n` nodes on one simulated network (fixed 1 ms delays), each serving the cluster and sync
/// protocols through a [`Tweaked`] handler; node `forger` (if any) forges its results.
struct Group {
    sim: SimNet,
    ids: Vec<PeerId>,
    nodes: Vec<(Arc<MajorityConsensus>, StorageRepo)>,
    delays: Vec<Arc<AtomicUsize>>,
}

fn group(n: usize, forger: Option<usize>) -> Group {
    let sim = SimNet::new(11, SimConfig { min_delay_ms: 1, max_delay_ms: 1, ..SimConfig::default() });
    let (mut ids, mut nodes, mut delays) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let keypair = Keypair::generate_ed25519();
        let me = keypair.public().to_peer_id();
        let local = StorageRepo::new(Arc::new(MemoryStorage::new()));
        let deps = MajorityDeps {
            keypair,
            network: sim.network(me),
            local: local.clone(),
            key_network: None,
            clock: sim.clock(),
            behind: None,
        };
        let consensus = Arc::new(MajorityConsensus::new(config(), deps).unwrap());
        let delay = Arc::new(AtomicUsize::new(0));
        let honest = optimystic_testkit::sim::NodeHandler::new(consensus.clone(), local.clone());
        sim.register(me, Arc::new(Tweaked { honest, delay_ms: delay.clone(), forge: forger == Some(i) }));
        ids.push(me);
        nodes.push((consensus, local));
        delays.push(delay);
    }
    Group { sim, ids, nodes, delays }
}

impl Group {
    /// The cluster of the given nodes.
    fn peers(&self, members: &[usize]) -> ClusterPeers {
        members.iter().map(|i| (self.ids[*i], PeerInfo::default())).collect()
    }

    /// Runs `operation` with node `via` coordinating among `members`.
    async fn run(&self, via: usize, members: &[usize], operation: RepoOperation) -> Result<RepoResponse, RepoError> {
        let now = self.sim.clock().now_ms();
        self.nodes[via].0.execute(&self.peers(members), &RepoMessage::new(operation, now + 5_000)).await
    }

    /// The copy node `i` keeps of the record that fixed revision `rev` of block `b` (its commit
    /// record).
    async fn kept_commit(&self, i: usize, b: &str, rev: u64) -> ClusterRecord {
        let evidence = self.nodes[i].1.evidence(&block(b), rev).await.unwrap().expect("evidence kept");
        ClusterRecord::from_value(evidence.commit).unwrap()
    }

    /// Approving commit votes (verified) in a kept record, by peer.
    fn approvers(&self, record: &ClusterRecord) -> std::collections::BTreeSet<usize> {
        record.verify(None).unwrap();
        record
            .commits
            .iter()
            .filter(|(_, v)| v.is_approve())
            .map(|(p, _)| self.ids.iter().position(|id| id.to_base58() == *p).unwrap())
            .collect()
    }

    async fn latest(&self, i: usize, b: &str) -> Option<optimystic_core::TrxRev> {
        self.nodes[i].1.storage().latest(&block(b)).await.unwrap()
    }

    /// Waits until the background work of the last records is done: final records and gossip
    /// (each due within `request_timeout_ms` of virtual time, twice that at most) have been
    /// answered.
    async fn wait_idle(&self) {
        self.sim.wait_quiet().await;
        for (consensus, _) in &self.nodes {
            consensus.wait_idle().await;
        }
        tokio::time::sleep(Duration::from_millis(config().request_timeout_ms * 2)).await;
        self.sim.wait_quiet().await;
    }
}

/// Issue 21 finding 2 / SPEC 4.4: a member answering first with an approving commit vote and a
/// forged stale result does not decide the client's answer: the pend and the commit succeed (on
/// the code before, the coordinator, which is not a member, answered with the first approving
/// member's unsigned result: "stale", and a client such as `txn` retried with a new trx, writing
/// twice).
#[tokio::test(start_paused = true)]
async fn a_forged_result_next_to_an_approving_vote_never_decides_the_answer() {
    let g = group(4, Some(1));
    let members = [1, 2, 3];
    // The forger answers at once, the honest members after 20 ms.
    g.delays[2].store(20, Ordering::SeqCst);
    g.delays[3].store(20, Ordering::SeqCst);
    let insert = RepoOperation::Pend(insert_pend("x", &trx("t1")));
    let pend = g.run(0, &members, insert).await;
    assert!(pended(&pend), "the pend's answer: {pend:?}");
    let commit = g.run(0, &members, commit_on("x", "t1", 1)).await;
    assert!(committed(&commit), "the commit's answer: {commit:?}");
    g.wait_idle().await;
    for i in members {
        assert_eq!(g.latest(i, "x").await.map(|l| l.rev), Some(1));
    }
    // The honest members hold each other's votes.
    // (Its vote itself is valid: it did apply, and its own gossip spreads it.)
    let kept = g.kept_commit(2, "x", 1).await;
    assert!(g.approvers(&kept).is_superset(&std::collections::BTreeSet::from([2, 3])));
}

/// SPEC 4.4: when no commit quorum reports success, the answer is `unavailable` (outcome
/// unknown), never the forged result of one member.
#[tokio::test(start_paused = true)]
async fn without_a_quorum_of_successes_the_answer_is_unavailable() {
    let g = group(4, Some(1));
    let members = [1, 2, 3];
    let insert = RepoOperation::Pend(insert_pend("x", &trx("t1")));
    assert!(pended(&g.run(0, &members, insert).await));
    g.wait_idle().await;
    // Node 3 never answers the decided record in time: the forger and node 2 remain.
    g.delays[3].store(60_000, Ordering::SeqCst);
    let commit = g.run(0, &members, commit_on("x", "t1", 1)).await;
    let e = commit.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e}");
}

/// SPEC 4.4 final record: after a commit quorum, every member's kept pend and commit records
/// carry the verified commit votes of every member (on the code before, kept records carried no
/// commit vote at all). The final record costs one message per other member.
#[tokio::test(start_paused = true)]
async fn every_member_keeps_every_commit_vote() {
    let g = group(3, None);
    let members = [0, 1, 2];
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    g.sim.set_filter(Some(Arc::new(move |e: &Envelope<'_>| {
        if e.direction == optimystic_testkit::sim::Direction::Request {
            counter.fetch_add(1, Ordering::SeqCst);
        }
        Verdict::Deliver
    })));
    assert!(pended(&g.run(0, &members, RepoOperation::Pend(insert_pend("x", &trx("t1")))).await));
    assert!(committed(&g.run(0, &members, commit_on("x", "t1", 1)).await));
    g.wait_idle().await;
    for i in members {
        let commit = g.kept_commit(i, "x", 1).await;
        assert_eq!(g.approvers(&commit), std::collections::BTreeSet::from([0, 1, 2]), "node {i}'s commit record");
        let evidence = g.nodes[i].1.evidence(&block("x"), 1).await.unwrap().unwrap();
        let pend = ClusterRecord::from_value(evidence.pend.unwrap()).unwrap();
        assert_eq!(g.approvers(&pend), std::collections::BTreeSet::from([0, 1, 2]), "node {i}'s pend record");
    }
    // Per record: 2 promise asks, 2 decided records and 2 final records; no gossip, since the
    // final record brought every vote before it was due.
    assert_eq!(requests.load(Ordering::SeqCst), 2 * 6, "cluster requests for two records");
}

/// Puts block `b` at revision 1 through consensus among `members` (node `via` coordinating).
async fn insert_through(g: &Group, via: usize, members: &[usize], b: &str) {
    let t = format!("init-{b}");
    assert!(pended(&g.run(via, members, RepoOperation::Pend(insert_pend(b, &trx(&t)))).await));
    assert!(committed(&g.run(via, members, commit_on(b, &t, 1)).await));
    g.wait_idle().await;
}

/// Issue 21 finding 12 (SPEC 4.4 vote gossip): the coordinator M2 dies right after answering its
/// client, before any final record; M3 was cut off from it. M1's gossiped vote makes M3 execute,
/// and M3's answer gives M1 the votes of a majority: M1 holds T1's execution proof (on the code
/// before, M1 kept no commit vote at all and M3 never learned of the commit).
#[tokio::test(start_paused = true)]
async fn a_coordinator_that_dies_after_answering_leaves_the_revision_proven() {
    let g = group(3, None);
    let (m1, m2, m3) = (0, 1, 2);
    let members = [m1, m2, m3];
    insert_through(&g, m2, &members, "x").await;
    assert!(pended(&g.run(m2, &members, set_on("x", "t1", Some(2), 1)).await));
    g.wait_idle().await;
    g.sim.block_link(g.ids[m2], g.ids[m3]);
    assert!(committed(&g.run(m2, &members, commit_on("x", "t1", 2)).await));
    g.sim.crash(g.ids[m2]);
    // M1 gossips its vote once no final record brought a quorum of votes.
    g.wait_idle().await;
    assert_eq!(g.latest(m3, "x").await.map(|l| l.trx_id), Some(trx("t1")), "M3 executed through M1's gossip");
    let kept = g.kept_commit(m1, "x", 2).await;
    let approvers = g.approvers(&kept);
    assert!(approvers.contains(&m1) && approvers.contains(&m3), "M1's proof: {approvers:?}");
}

/// SPEC 4.20: a member promises a commit only when the record's peer set holds a majority of
/// P(r-1), and a coordinator that knows P(r-1) waits for approvals that include one.
#[tokio::test(start_paused = true)]
async fn a_peer_set_without_a_majority_of_the_custodians_is_refused() {
    let g = group(5, None);
    let old = [0, 1, 2];
    insert_through(&g, 0, &old, "x").await;
    // Nodes 3 and 4 hold revision 1 with its evidence.
    let evidence = g.nodes[0].1.evidence(&block("x"), 1).await.unwrap().unwrap();
    let transform = g.nodes[0].1.storage().committed(&block("x"), &trx("init-x")).await.unwrap().unwrap().transform;
    let rev1 = optimystic_core::TrxRev { trx_id: trx("init-x"), rev: 1 };
    for i in [3, 4] {
        assert!(g.nodes[i].1.apply_replica(&block("x"), &rev1, &transform, Some(&evidence)).await.unwrap());
    }
    // {2, 3, 4} holds one custodian of revision 1: its pend goes through, its commit does not.
    let shifted = [2, 3, 4];
    assert!(pended(&g.run(3, &shifted, set_on("x", "t2", Some(2), 2)).await));
    g.wait_idle().await;
    let commit = g.run(3, &shifted, commit_on("x", "t2", 2)).await;
    assert!(!committed(&commit), "{commit:?}");
    for i in shifted {
        assert_eq!(g.latest(i, "x").await.map(|l| l.rev), Some(1));
    }
    g.wait_idle().await;
    // {0, 1, 3}, coordinated by 0, node 1 slow: the first quorum, {0, 3}, holds one custodian of
    // revision 1, so node 0 waits for node 1's approval as well, and the commit goes through.
    let mixed = [0, 1, 3];
    g.delays[1].store(30, Ordering::SeqCst);
    assert!(pended(&g.run(0, &mixed, set_on("x", "t3", Some(2), 3)).await));
    g.wait_idle().await;
    let commit = g.run(0, &mixed, commit_on("x", "t3", 2)).await;
    assert!(committed(&commit), "{commit:?}");
}

/// SPEC 4.4: the copy a member keeps of a decided record carries its own commit vote from its
/// execution, then gains the verified votes of final records and gossip, and never loses one; a
/// forged vote changes nothing.
#[tokio::test(start_paused = true)]
async fn kept_records_only_gain_verified_commit_votes() {
    let Three { m, a, b, peers } = three();
    let [me, pa, pb] = peers.map(|p| p.to_base58());
    let now = m.sim.clock().now_ms();
    let pend = decided(&peers, insert_x(), now + 1_000, &a, &b);
    m.consensus.on_update(peers[1], pend.clone()).await.unwrap();
    let voters = || async {
        let kept = m.local.kept_record(&pend.message_hash).await.unwrap().unwrap();
        kept.verify(None).unwrap();
        kept.commits.keys().cloned().collect::<Vec<_>>()
    };
    let mut expected = vec![me.clone()];
    assert_eq!(voters().await, expected, "its own vote, kept at execution");
    let mut with_a = pend.clone();
    with_a.commits.insert(pa.clone(), pend.sign_commit(&a, VoteType::Approve, None).unwrap());
    m.consensus.on_update(peers[1], with_a).await.unwrap();
    expected.push(pa.clone());
    expected.sort();
    assert_eq!(voters().await, expected, "a final record's vote");
    // A vote b never signed is ignored: nothing changes.
    let mut forged = pend.clone();
    forged.commits.insert(pb.clone(), pend.sign_commit(&a, VoteType::Reject, Some("x".into())).unwrap());
    let _ = m.consensus.on_update(peers[1], forged).await;
    assert_eq!(voters().await, expected, "a forged vote was kept");
    // Gossip carrying b's vote only: the others stay.
    let mut with_b = pend.clone();
    with_b.commits.insert(pb.clone(), pend.sign_commit(&b, VoteType::Approve, None).unwrap());
    let answer = m.consensus.on_update(peers[2], with_b).await.unwrap();
    expected.push(pb);
    expected.sort();
    assert_eq!(voters().await, expected, "a gossiped vote");
    assert_eq!(answer.commits.len(), 3, "the answer carries every vote kept");
    // Catch-up storing the revision with a served copy of the pend record that has fewer votes
    // keeps the votes the member had.
    let commit = decided(&peers, commit_op("t1", 1), now + 1_000, &a, &b);
    let served = optimystic_core::evidence::Evidence { pend: Some(pend.to_value()), commit: commit.to_value() };
    let RepoOperation::Pend(request) = insert_x() else { unreachable!() };
    let transform = request.transforms.transform_for(&x());
    let t1 = optimystic_core::TrxRev { trx_id: trx("t1"), rev: 1 };
    assert!(m.local.apply_replica(&x(), &t1, &transform, Some(&served)).await.unwrap());
    assert_eq!(voters().await, expected, "catch-up dropped kept votes");
}

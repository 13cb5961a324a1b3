//! Catch-up that one bad peer cannot bend (SPEC 4.10 (d), 4.20): execution proof counted over
//! the receiver's trusted set, the catch-up base, stored evidence fields, and quorum reads that an
//! unproven claim does not fail. Each test is a scenario of issue 21.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use optimystic_core::evidence::Evidence;
use optimystic_core::identity::{Keypair, PeerId};
use optimystic_core::keynet::{ClusterPeers, KeyNetwork, KeyNetworkError, PeerInfo};
use optimystic_core::kv::MemoryStorage;
use optimystic_core::model::{BlockGets, CommitRequest, PendPolicy, PendRequest, ReadMode};
use optimystic_core::network::ProtocolKind;
use optimystic_core::reads::ClusterReads;
use optimystic_core::record::{ClusterPeer, ClusterRecord, VoteType};
use optimystic_core::sync::{CatchUp, SyncServer};
use optimystic_core::wire::{RepoMessage, RepoOperation};
use optimystic_core::{
    Block, BlockId, BlockOperation, MessageOptions, RawStorage, Repo, RepoError, StorageRepo, Transform, Transforms,
    TrxId, TrxRev,
};
use optimystic_testkit::sim::{SimConfig, SimHandler, SimNet};
use serde_json::{Value, json};

fn x() -> BlockId {
    BlockId::new("x").unwrap()
}

fn trx(text: &str) -> TrxId {
    TrxId::new(text).unwrap()
}

fn at(text: &str, rev: u64) -> TrxRev {
    TrxRev { trx_id: trx(text), rev }
}

fn insert() -> Transform {
    Transform { insert: Some(Block::new(x(), "t", "c").with_field("v", json!(0))), ..Transform::default() }
}

fn set(v: i64) -> Transform {
    Transform { updates: Some(vec![BlockOperation::set("v", json!(v))]), ..Transform::default() }
}

fn id(key: &Keypair) -> PeerId {
    key.public().to_peer_id()
}

/// A record of `operation` among `peers`, with approving promises of `promisers`, then approving
/// commit votes ("applied here") of `executed`.
fn record(peers: &[PeerId], operation: RepoOperation, promisers: &[&Keypair], executed: &[&Keypair]) -> Value {
    let peer_set = peers.iter().map(|p| (p.to_base58(), ClusterPeer::new(p, vec![]).unwrap())).collect();
    let mut record = ClusterRecord::new(peer_set, serde_json::to_value(RepoMessage::new(operation, 1)).unwrap());
    for key in promisers {
        let vote = record.sign_promise(key, VoteType::Approve, None).unwrap();
        record.promises.insert(id(key).to_base58(), vote);
    }
    for key in executed {
        let vote = record.sign_commit(key, VoteType::Approve, None).unwrap();
        record.commits.insert(id(key).to_base58(), vote);
    }
    record.to_value()
}

fn pend(trx_id: &str, rev: u64, transform: &Transform) -> RepoOperation {
    RepoOperation::Pend(PendRequest {
        trx_id: trx(trx_id),
        rev: Some(rev),
        transforms: Transforms::single(&x(), transform),
        policy: PendPolicy::Continue,
    })
}

fn commit(trx_id: &str, rev: u64) -> RepoOperation {
    RepoOperation::Commit(CommitRequest {
        trx_id: trx(trx_id),
        block_ids: vec![x()],
        rev,
        tail_id: x(),
        header_id: None,
    })
}

/// The evidence of `trx_id` at `rev` among `peers`: both records decided by `promisers`, the pend
/// executed by `pend_executed`, the commit by `commit_executed`.
fn evidence(
    peers: &[PeerId],
    trx_id: &str,
    rev: u64,
    transform: &Transform,
    promisers: &[&Keypair],
    pend_executed: &[&Keypair],
    commit_executed: &[&Keypair],
) -> Evidence {
    Evidence {
        pend: Some(record(peers, pend(trx_id, rev, transform), promisers, pend_executed)),
        commit: record(peers, commit(trx_id, rev), promisers, commit_executed),
    }
}

/// One revision of a node's history: its transaction, transform and the evidence it keeps.
struct Step {
    trx_rev: TrxRev,
    transform: Transform,
    evidence: Option<Evidence>,
}

fn step(trx_id: &str, rev: u64, transform: Transform, evidence: Option<Evidence>) -> Step {
    Step { trx_rev: at(trx_id, rev), transform, evidence }
}

/// A node's storage holding `history`.
async fn holding(history: &[Step]) -> StorageRepo {
    let repo = StorageRepo::new(Arc::new(MemoryStorage::new()));
    for s in history {
        assert!(repo.apply_replica(&x(), &s.trx_rev, &s.transform, s.evidence.as_ref()).await.unwrap());
    }
    repo
}

/// Serves the sync protocol from a repository.
struct Serve(SyncServer);

impl SimHandler for Serve {
    fn handle(&self, _from: PeerId, _p: ProtocolKind, request: Value) -> BoxFuture<'static, Result<Value, RepoError>> {
        let server = self.0.clone();
        Box::pin(async move { server.handle(request).await })
    }
}

/// A node of the version before the catch-up base: its sync requests take no unknown fields.
struct OldServe {
    server: SyncServer,
    refused: Arc<AtomicUsize>,
}

impl SimHandler for OldServe {
    fn handle(&self, _from: PeerId, _p: ProtocolKind, request: Value) -> BoxFuture<'static, Result<Value, RepoError>> {
        let (server, refused) = (self.server.clone(), self.refused.clone());
        Box::pin(async move {
            let known = ["op", "blockId", "blockIds", "afterRev", "limit"];
            if let Some(unknown) = request.as_object().and_then(|o| o.keys().find(|k| !known.contains(&k.as_str()))) {
                refused.fetch_add(1, Ordering::SeqCst);
                return Err(RepoError::BadRequest(format!("sync request: unknown field `{unknown}`")));
            }
            server.handle(request).await
        })
    }
}

/// Claims revision 1,000,000 and serves `page` for revisions (an error when `None`).
struct Claimer {
    page: Option<Value>,
}

impl SimHandler for Claimer {
    fn handle(&self, _from: PeerId, _p: ProtocolKind, request: Value) -> BoxFuture<'static, Result<Value, RepoError>> {
        let answer = if request["op"] == json!("latest") {
            Ok(json!({"latest": {"x": {"trxId": "claimed", "rev": 1_000_000}}}))
        } else {
            self.page.clone().ok_or_else(|| RepoError::Unavailable("no page for you".into()))
        };
        Box::pin(async move { answer })
    }
}

/// A key network whose cluster of every block is `view`, ranked `ranking` beyond it.
#[derive(Debug)]
struct Seen {
    view: Vec<PeerId>,
    ranking: Vec<PeerId>,
}

fn seen(view: &[PeerId]) -> Arc<Seen> {
    Arc::new(Seen { view: view.to_vec(), ranking: view.to_vec() })
}

#[async_trait::async_trait]
impl KeyNetwork for Seen {
    async fn find_cluster(&self, _block_id: &BlockId) -> Result<ClusterPeers, KeyNetworkError> {
        Ok(self.view.iter().map(|p| (*p, PeerInfo::default())).collect())
    }
    async fn find_coordinator(&self, _b: &BlockId, _e: &[PeerId]) -> Result<PeerId, KeyNetworkError> {
        Ok(self.view[0])
    }
    async fn ranked(&self, _block_id: &BlockId, n: usize) -> Result<Vec<PeerId>, KeyNetworkError> {
        Ok(self.ranking.iter().copied().take(n).collect())
    }
    fn cluster_size(&self) -> usize {
        self.view.len()
    }
    async fn has_seen(&self, peer: &PeerId) -> bool {
        self.ranking.contains(peer)
    }
}

fn catch_up(sim: &SimNet, me: PeerId, local: &StorageRepo, view: &[PeerId]) -> CatchUp {
    CatchUp::new(sim.network(me), local.clone(), seen(view), Duration::from_millis(500))
}

async fn latest(repo: &StorageRepo) -> Option<TrxRev> {
    repo.storage().latest(&x()).await.unwrap()
}

async fn value(repo: &StorageRepo) -> Value {
    repo.latest_value(&x()).await.unwrap().1.unwrap().fields["v"].clone()
}

/// `n` keys, sorted by peer id (so the order in which catch-up asks peers is known: the newest
/// claim first, the greater peer id first among equal claims).
fn keys(n: usize) -> Vec<Keypair> {
    let mut keys: Vec<Keypair> = (0..n).map(|_| Keypair::generate_ed25519()).collect();
    keys.sort_by_key(id);
    keys
}

/// Finding 1 (critical): cluster {M1, M2, B}, B malicious. B's pend of T1 is decided and
/// executed; M1 and M2 promise B's commit of T1 at revision 2, B keeps the decided commit to
/// itself and M1 and M2 renounce it; T2 commits at revision 2 (M1 and B executing) while M2 is
/// cut off. M2 catching up from B must not apply T1@2 (its commit record has a promise quorum
/// but only B's commit vote), and a newcomer must end with T2@2.
#[tokio::test(start_paused = true)]
async fn a_renounced_commit_record_forks_no_replica() {
    let k = keys(4);
    // B sorts after M1, so catch-up asks B first among equal claims.
    let (m1, newcomer, m2, b) = (&k[0], &k[1], &k[2], &k[3]);
    let cluster = [id(m1), id(m2), id(b)];
    let t0 = || evidence(&cluster, "t0", 1, &insert(), &[m1, m2, b], &[m1, m2, b], &[m1, m2, b]);
    let t1 = evidence(&cluster, "t1", 2, &set(1), &[m1, m2, b], &[m1, m2, b], &[b]);
    let t2 = evidence(&cluster, "t2", 2, &set(2), &[m1, b], &[m1, b], &[m1, b]);
    let sim = SimNet::new(1, SimConfig::default());
    let b_store = holding(&[step("t0", 1, insert(), Some(t0())), step("t1", 2, set(1), Some(t1))]).await;
    let m1_store = holding(&[step("t0", 1, insert(), Some(t0())), step("t2", 2, set(2), Some(t2))]).await;
    sim.register(id(b), Arc::new(Serve(SyncServer::new(b_store))));

    // M2, cut off from M1, catches up from B alone.
    let m2_store = holding(&[step("t0", 1, insert(), Some(t0()))]).await;
    let applied = catch_up(&sim, id(m2), &m2_store, &cluster).catch_up_in(&x(), &cluster).await.unwrap();
    assert_eq!(applied, 0, "a decided commit record that only its coordinator executed was applied");
    assert_eq!(latest(&m2_store).await, Some(at("t0", 1)));

    // M1 is back; a newcomer whose view is {M1, B, newcomer} catches up from both.
    sim.register(id(m1), Arc::new(Serve(SyncServer::new(m1_store))));
    let view = [id(m1), id(b), id(newcomer)];
    let fresh = StorageRepo::new(Arc::new(MemoryStorage::new()));
    catch_up(&sim, id(newcomer), &fresh, &view).catch_up_in(&x(), &view).await.unwrap();
    assert_eq!(latest(&fresh).await, Some(at("t2", 2)), "the newcomer must hold the acknowledged T2");
    assert_eq!(value(&fresh).await, json!(2));
    // And M2, reaching M1 as well, takes T2.
    catch_up(&sim, id(m2), &m2_store, &cluster).catch_up_in(&x(), &cluster).await.unwrap();
    assert_eq!(latest(&m2_store).await, Some(at("t2", 2)));
}

/// Finding 13: member B makes M1 see a fresh key X and builds records with peer set {M1, B, X};
/// M1 promised them, but only B and X executed them. Commit votes count only from the receiver's
/// trusted set (its view {M1, M2, B}, or P(L)), so the records prove nothing.
#[tokio::test(start_paused = true)]
async fn a_record_peer_set_never_vouches_for_itself() {
    let k = keys(4);
    let (m1, m2, b, made) = (&k[0], &k[1], &k[2], &k[3]);
    let cluster = [id(m1), id(m2), id(b)];
    let padded = [id(m1), id(b), id(made)];
    let t0 = || evidence(&cluster, "t0", 1, &insert(), &[m1, m2, b], &[m1, m2, b], &[m1, m2, b]);
    let forged = evidence(&padded, "tx", 2, &set(9), &[m1, b, made], &[b, made], &[b, made]);
    let sim = SimNet::new(1, SimConfig::default());
    let b_store = holding(&[step("t0", 1, insert(), Some(t0())), step("tx", 2, set(9), Some(forged))]).await;
    sim.register(id(b), Arc::new(Serve(SyncServer::new(b_store))));
    let m1_store = holding(&[step("t0", 1, insert(), Some(t0()))]).await;
    let applied = catch_up(&sim, id(m1), &m1_store, &cluster).catch_up_in(&x(), &cluster).await.unwrap();
    assert_eq!(applied, 0, "votes from a record's own peer set counted as execution proof");
    assert_eq!(latest(&m1_store).await, Some(at("t0", 1)));
}

/// Finding 15: a renounced pend of the client's trx with a forged transform (decided, never
/// executed), served with the real, proven commit: the pend record carries no execution proof,
/// so the forged value is not applied; the executed pend record is.
#[tokio::test(start_paused = true)]
async fn a_forged_pend_transform_with_a_real_commit_proof_is_not_applied() {
    let k = keys(4);
    let (m1, m2, m3, b) = (&k[0], &k[1], &k[2], &k[3]);
    let cluster = [id(m1), id(m2), id(b)];
    let t0 = || evidence(&cluster, "t0", 1, &insert(), &[m1, m2, b], &[m1, m2, b], &[m1, m2, b]);
    let real = evidence(&cluster, "t1", 2, &set(1), &[m1, m2, b], &[m1, m2], &[m1, m2]);
    let forged_pend = record(&cluster, pend("t1", 2, &set(666)), &[m1, m2, b], &[]);
    let forged = Evidence { pend: Some(forged_pend), commit: real.commit.clone() };
    let sim = SimNet::new(1, SimConfig::default());
    let b_store = holding(&[step("t0", 1, insert(), Some(t0())), step("t1", 2, set(666), Some(forged))]).await;
    sim.register(id(b), Arc::new(Serve(SyncServer::new(b_store))));
    // The receiver replaced M2 in the view; M2 is unreachable.
    let view = [id(m1), id(m3), id(b)];
    let m3_store = holding(&[step("t0", 1, insert(), Some(t0()))]).await;
    let applied = catch_up(&sim, id(m3), &m3_store, &view).catch_up_in(&x(), &view).await.unwrap();
    assert_eq!(applied, 0, "a forged transform was applied on the strength of the commit's proof");
    assert_eq!(latest(&m3_store).await, Some(at("t0", 1)));

    let m1_store = holding(&[step("t0", 1, insert(), Some(t0())), step("t1", 2, set(1), Some(real))]).await;
    sim.register(id(m1), Arc::new(Serve(SyncServer::new(m1_store))));
    catch_up(&sim, id(m3), &m3_store, &view).catch_up_in(&x(), &view).await.unwrap();
    assert_eq!(latest(&m3_store).await, Some(at("t1", 2)));
    assert_eq!(value(&m3_store).await, json!(1), "the value applied is the executed one");
}

/// Finding 14: only M3 executed T1 at revision 2 (no proof), then was cut off; T1 was renounced
/// by the others, T2@2 and T3@3 are proven. M3 must not apply T3 on top of T1, with a server of
/// this version (which answers from after M3's newest proven revision) or of the one before
/// (which refuses the catch-up base; M3 then asks as older nodes do).
#[tokio::test(start_paused = true)]
async fn catch_up_never_builds_on_a_diverging_provisional_revision() {
    for old_server in [false, true] {
        let k = keys(3);
        let (m1, m2, m3) = (&k[0], &k[1], &k[2]);
        let cluster = [id(m1), id(m2), id(m3)];
        let all = [m1, m2, m3];
        let t0 = || evidence(&cluster, "t0", 1, &insert(), &all, &all, &all);
        let t2 = evidence(&cluster, "t2", 2, &set(2), &[m1, m2], &[m1, m2], &[m1, m2]);
        let t3 = evidence(&cluster, "t3", 3, &set(3), &[m1, m2], &[m1, m2], &[m1, m2]);
        let sim = SimNet::new(1, SimConfig::default());
        let m1_store = holding(&[
            step("t0", 1, insert(), Some(t0())),
            step("t2", 2, set(2), Some(t2)),
            step("t3", 3, set(3), Some(t3)),
        ])
        .await;
        let refused = Arc::new(AtomicUsize::new(0));
        let server = SyncServer::new(m1_store);
        if old_server {
            sim.register(id(m1), Arc::new(OldServe { server, refused: refused.clone() }));
        } else {
            sim.register(id(m1), Arc::new(Serve(server)));
        }
        // M3 executed T1@2 on its own: provisional (no proof kept).
        let m3_store = holding(&[step("t0", 1, insert(), Some(t0())), step("t1", 2, set(1), None)]).await;
        assert_eq!(m3_store.newest_proven(&x(), &cluster).await.unwrap().map(|p| p.trx_rev), Some(at("t0", 1)));
        let applied = catch_up(&sim, id(m3), &m3_store, &cluster).catch_up_in(&x(), &cluster).await.unwrap();
        assert_eq!(applied, 0, "old server {old_server}: a revision was applied on a diverging base");
        assert_eq!(latest(&m3_store).await, Some(at("t1", 2)));
        assert_eq!(value(&m3_store).await, json!(1));
        assert_eq!(refused.load(Ordering::SeqCst) > 0, old_server);
    }
}

/// SPEC 4.20 catch-up base, both directions of a mixed-version cluster: a new node catches up
/// from a server of the version before (which refuses the new optional fields), and a request of
/// the version before (without them) is answered by a new server as it was.
#[tokio::test(start_paused = true)]
async fn catch_up_works_across_versions() {
    let k = keys(3);
    let cluster: Vec<PeerId> = k.iter().map(id).collect();
    let all: Vec<&Keypair> = k.iter().collect();
    let history = || {
        vec![
            step("t0", 1, insert(), Some(evidence(&cluster, "t0", 1, &insert(), &all, &all, &all))),
            step("t1", 2, set(1), Some(evidence(&cluster, "t1", 2, &set(1), &all, &all, &all))),
            step("t2", 3, set(2), Some(evidence(&cluster, "t2", 3, &set(2), &all, &all, &all))),
        ]
    };
    let sim = SimNet::new(1, SimConfig::default());
    let refused = Arc::new(AtomicUsize::new(0));
    let server = SyncServer::new(holding(&history()).await);
    sim.register(cluster[0], Arc::new(OldServe { server: server.clone(), refused: refused.clone() }));
    let receiver = holding(&history()[..1]).await;
    let applied = catch_up(&sim, cluster[2], &receiver, &cluster).catch_up_in(&x(), &cluster).await.unwrap();
    assert_eq!(applied, 2);
    assert_eq!(latest(&receiver).await, Some(at("t2", 3)));
    assert!(refused.load(Ordering::SeqCst) > 0, "the old server never saw the new fields");
    // An old node's request: no base fields.
    let old = json!({"op": "revisions", "blockId": "x", "afterRev": 1, "limit": 10});
    let page = server.handle(old).await.unwrap();
    let revs: Vec<u64> = page["entries"].as_array().unwrap().iter().map(|e| e["rev"].as_u64().unwrap()).collect();
    assert_eq!(revs, [2, 3]);
    // A new request whose base matches is answered from afterRev; one whose base diverges, from
    // after its proven revision.
    let matching = json!({"op": "revisions", "blockId": "x", "afterRev": 1, "limit": 10,
        "latest": {"trxId": "t1", "rev": 2}, "proven": 2});
    let page = server.handle(matching).await.unwrap();
    assert_eq!(page["entries"][0]["rev"], json!(2));
    let diverging = json!({"op": "revisions", "blockId": "x", "afterRev": 2, "limit": 10,
        "latest": {"trxId": "other", "rev": 3}, "proven": 1});
    let page = server.handle(diverging).await.unwrap();
    assert_eq!(page["entries"][0]["rev"], json!(2));
}

/// Finding 8: a serving peer pads the records of a revision's evidence with a 1 MB unknown
/// field (top level, in a peer entry and in a commit vote): the receiver stores only what hashes
/// and signatures cover, so what it keeps and serves on stays the normal size.
#[tokio::test(start_paused = true)]
async fn padded_evidence_is_stored_without_its_padding() {
    let k = keys(3);
    let cluster: Vec<PeerId> = k.iter().map(id).collect();
    let all: Vec<&Keypair> = k.iter().collect();
    let pad = "p".repeat(1_000_000);
    let padded = |mut value: Value| {
        value["padding"] = json!(pad);
        let first = cluster[0].to_base58();
        value["peers"][&first]["padding"] = json!(pad);
        value["commits"][&first]["padding"] = json!(pad);
        value
    };
    let normal =
        |trx_id: &str, rev: u64, transform: &Transform| evidence(&cluster, trx_id, rev, transform, &all, &all, &all);
    let t1 = normal("t1", 2, &set(1));
    let bloated = Evidence { pend: t1.pend.clone().map(padded), commit: padded(t1.commit.clone()) };
    let sim = SimNet::new(1, SimConfig::default());
    let server =
        holding(&[step("t0", 1, insert(), Some(normal("t0", 1, &insert()))), step("t1", 2, set(1), Some(bloated))])
            .await;
    sim.register(cluster[0], Arc::new(Serve(SyncServer::new(server))));
    let storage = Arc::new(MemoryStorage::new());
    let receiver = StorageRepo::new(storage.clone());
    catch_up(&sim, cluster[2], &receiver, &cluster).catch_up_in(&x(), &cluster).await.unwrap();
    assert_eq!(latest(&receiver).await, Some(at("t1", 2)));
    let kept: usize = storage.list_meta("", 10_000).await.unwrap().iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(kept < 64 * 1024, "{kept} bytes of metadata kept for two revisions");
    let served = receiver.evidence(&x(), 2).await.unwrap().unwrap();
    assert!(!serde_json::to_string(&served).unwrap().contains("padding"));
    assert_eq!(served.commit["messageHash"], t1.commit["messageHash"]);
    assert!(optimystic_core::evidence::verify(Some(&served), &x(), &at("t1", 2), &set(1), &cluster).is_ok());
}

/// A quorum-reading node `me` over `view`, ranking `ranking` beyond it.
fn reader(sim: &SimNet, me: PeerId, local: &StorageRepo, view: &[PeerId], ranking: &[PeerId]) -> ClusterReads {
    let key_network = Arc::new(Seen { view: view.to_vec(), ranking: ranking.to_vec() });
    ClusterReads::new(
        Arc::new(local.clone()),
        local.clone(),
        key_network,
        sim.network(me),
        ReadMode::Quorum,
        Duration::from_millis(500),
    )
}

/// Finding 4: view {me, A, L}; me and A answer revision 1; L claims revision 1,000,000 and
/// serves errors or unproven entries, as a member or as the stand-in of a member that does not
/// answer: every quorum read succeeds at revision 1.
#[tokio::test(start_paused = true)]
async fn an_unproven_claim_fails_no_quorum_read() {
    let k = keys(4);
    let (me, a, l, down) = (id(&k[0]), id(&k[1]), id(&k[2]), id(&k[3]));
    let t0 = evidence(&[me, a, l], "t0", 1, &insert(), &[&k[0], &k[1]], &[&k[0], &k[1]], &[&k[0], &k[1]]);
    let unproven_page = json!({"latest": {"trxId": "claimed", "rev": 1_000_000}, "more": true, "entries": [
        {"trxId": "t0", "rev": 1, "transform": insert()},
        {"trxId": "claimed", "rev": 2, "transform": set(7)},
    ]});
    for page in [None, Some(unproven_page)] {
        let sim = SimNet::new(1, SimConfig::default());
        let mine = holding(&[step("t0", 1, insert(), Some(t0.clone()))]).await;
        let theirs = holding(&[step("t0", 1, insert(), Some(t0.clone()))]).await;
        sim.register(a, Arc::new(Serve(SyncServer::new(theirs))));
        sim.register(l, Arc::new(Claimer { page: page.clone() }));
        let gets = BlockGets { block_ids: vec![x()], context: None, read_mode: None };
        let o = MessageOptions::default();
        for (view, ranking) in [(vec![me, a, l], vec![me, a, l]), (vec![me, a, down], vec![me, a, down, l])] {
            let reads = reader(&sim, me, &mine, &view, &ranking);
            for _ in 0..3 {
                let answer = reads.get(&gets, &o).await;
                let answer = answer.unwrap_or_else(|e| panic!("view {view:?}, page {page:?}: {e}"));
                assert_eq!(answer[&x()].state.latest, Some(at("t0", 1)));
            }
        }
        assert_eq!(latest(&mine).await, Some(at("t0", 1)), "nothing unproven was applied");
    }
}

/// SPEC 4.10 quorum-of-view fallback: a revision whose evidence is decided but no execution proof
/// (no commit votes yet) is applied only because a quorum of the view reports it identically; it
/// stays provisional (not this node's newest proven revision), and its evidence is kept so that
/// commit votes reaching it later can prove it.
#[tokio::test(start_paused = true)]
async fn a_revision_taken_by_agreement_stays_provisional() {
    let k = keys(3);
    let cluster: Vec<PeerId> = k.iter().map(id).collect();
    let all: Vec<&Keypair> = k.iter().collect();
    let t0 = || evidence(&cluster, "t0", 1, &insert(), &all, &all, &all);
    let decided_only = || evidence(&cluster, "t1", 2, &set(1), &all, &[], &[]);
    let sim = SimNet::new(1, SimConfig::default());
    for peer in &cluster[..2] {
        let store = holding(&[step("t0", 1, insert(), Some(t0())), step("t1", 2, set(1), Some(decided_only()))]).await;
        sim.register(*peer, Arc::new(Serve(SyncServer::new(store))));
    }
    let receiver = holding(&[step("t0", 1, insert(), Some(t0()))]).await;
    let applied = catch_up(&sim, cluster[2], &receiver, &cluster).catch_up_in(&x(), &cluster).await.unwrap();
    assert_eq!(applied, 1);
    assert_eq!(latest(&receiver).await, Some(at("t1", 2)));
    assert!(receiver.evidence(&x(), 2).await.unwrap().is_some(), "the decided records are kept");
    let proven = receiver.newest_proven(&x(), &cluster).await.unwrap().map(|p| p.trx_rev);
    assert_eq!(proven, Some(at("t0", 1)), "a revision taken by agreement is not proven");
}

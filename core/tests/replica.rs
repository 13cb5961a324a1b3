//! `StorageRepo::apply_replica`: applying revisions committed elsewhere (catch-up).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::sync::Arc;

use common::MiniStorage;
use optimystic_core::model::{PendPolicy, PendRequest};
use optimystic_core::{
    Block, BlockId, BlockOperation, MessageOptions, RawStorage, Repo, RepoError, StorageRepo, Transform,
    TransformError, Transforms, TrxId, TrxRev,
};
use serde_json::json;

fn bid(id: &str) -> BlockId {
    BlockId::new(id).unwrap()
}

fn rev(trx: &str, rev: u64) -> TrxRev {
    TrxRev { trx_id: TrxId::new(trx).unwrap(), rev }
}

fn insert(id: &str) -> Transform {
    Transform { insert: Some(Block::new(bid(id), "t", "c").with_field("n", json!(0))), ..Transform::default() }
}

fn set_n(n: i64) -> Transform {
    Transform { updates: Some(vec![BlockOperation::set("n", json!(n))]), ..Transform::default() }
}

#[tokio::test]
async fn replicas_apply_in_order_idempotently_and_never_rewrite_history() {
    let storage = Arc::new(MiniStorage::new());
    let repo = StorageRepo::new(storage.clone());
    let a = bid("a");

    assert!(repo.apply_replica(&a, &rev("t1", 1), &insert("a"), None).await.unwrap());
    assert!(!repo.apply_replica(&a, &rev("t1", 1), &insert("a"), None).await.unwrap(), "a second apply is a no-op");

    // A trx pending here is committed by the replica and no longer pending.
    let pend = PendRequest {
        trx_id: TrxId::new("t2").unwrap(),
        rev: Some(2),
        transforms: Transforms::single(&a, &set_n(2)),
        policy: PendPolicy::Continue,
    };
    repo.pend(&pend, &MessageOptions::default()).await.unwrap();
    assert!(repo.apply_replica(&a, &rev("t2", 2), &set_n(2), None).await.unwrap());
    assert!(storage.pending(&a, &TrxId::new("t2").unwrap()).await.unwrap().is_none());
    assert_eq!(storage.latest(&a).await.unwrap(), Some(rev("t2", 2)));
    assert_eq!(repo.value_at(&a, 2).await.unwrap().unwrap().fields["n"], json!(2));

    let before = storage.dump();
    let diverged = repo.apply_replica(&a, &rev("other", 2), &set_n(9), None).await;
    assert!(matches!(diverged, Err(RepoError::Internal(_))), "another trx at rev 2: {diverged:?}");
    let older = repo.apply_replica(&a, &rev("t0", 1), &set_n(9), None).await;
    assert!(matches!(older, Err(RepoError::Internal(_))), "an older revision: {older:?}");
    let twice = repo.apply_replica(&a, &rev("t1", 3), &set_n(9), None).await;
    assert!(matches!(twice, Err(RepoError::Internal(_))), "t1 committed at another rev: {twice:?}");
    let gap = repo.apply_replica(&a, &rev("t9", 9), &set_n(9), None).await;
    assert!(matches!(&gap, Err(RepoError::BadRequest(m)) if m.contains("revision gap")), "a revision gap: {gap:?}");
    let invalid = repo
        .apply_replica(
            &a,
            &rev("t9", 3),
            &Transform {
                updates: Some(vec![BlockOperation::splice("nope", 0, 0, vec![json!(1)])]),
                ..Transform::default()
            },
            None,
        )
        .await;
    assert!(
        matches!(invalid, Err(RepoError::InvalidTransform { reason: TransformError::MissingField { .. }, .. })),
        "{invalid:?}"
    );
    let header = repo
        .apply_replica(
            &a,
            &rev("t9", 3),
            &Transform { updates: Some(vec![BlockOperation::set("header", json!(1))]), ..Transform::default() },
            None,
        )
        .await;
    assert!(matches!(header, Err(RepoError::InvalidTransform { reason: TransformError::HeaderChange, .. })));
    assert_eq!(storage.dump(), before, "refused replicas change nothing");
}

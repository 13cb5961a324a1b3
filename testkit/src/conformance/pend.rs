//! Rules of SPEC 2 `pend` (validation, staleness, policies, re-pend) and `cancel`.

use serde_json::json;

use super::Fixture;
use super::support::{
    Harness, Tx, assert_invalid, base_fields, bid, block, describe, missing_of, refs, set, splice, tid, with_base_block,
};
use optimystic_core::error::{RepoError, TransformError};
use optimystic_core::model::{BlockOperation, PendPolicy, Transforms, TrxContext, TrxId};

/// Pends `transforms` as a fresh trx and expects `InvalidTransform` on `block` with `source`,
/// leaving the store unchanged.
async fn expect_invalid(h: &Harness, transforms: Transforms, block: &str, source: TransformError, what: &str) {
    let ids = ["a", "b", "c", "ghost"];
    let before = h.snapshot(&ids).await;
    let next = before.blocks.values().filter_map(|b| b.latest.as_ref()).map(|l| l.rev).max().unwrap_or(0) + 1;
    for policy in [PendPolicy::Continue, PendPolicy::Fail, PendPolicy::Return] {
        for rev in [None, Some(next)] {
            let result = h.pend("t-bad", rev, transforms.clone(), policy).await;
            assert_invalid(&result, block, &source, &format!("{what} (policy {policy:?}, rev {rev:?})"));
        }
    }
    assert_eq!(h.snapshot(&ids).await, before, "{what}: a rejected pend must change nothing");
}

/// SPEC 2 pend.1: an insert whose `header.id` differs from its key is invalid.
pub async fn pend_rejects_insert_id_mismatch(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    let source = TransformError::InsertIdMismatch { key: bid("b"), header_id: bid("c") };
    expect_invalid(&h, Tx::new().insert_block("b", block("c", json!({}))).build(), "b", source.clone(), "mismatch")
        .await;
    // With a valid update of another block in the same trx: nothing is pended on `a` either.
    let transforms = Tx::new().update("a", vec![set("n", json!(1))]).insert_block("b", block("c", json!({}))).build();
    expect_invalid(&h, transforms, "b", source, "mismatch beside a valid update").await;
}

/// SPEC 1.1 / 2 pend.1: an operation that changes `header` (set or splice) is invalid.
pub async fn pend_rejects_header_change(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    let header = json!({"id": "a", "type": "other", "collectionId": "x"});
    expect_invalid(
        &h,
        Tx::new().update("a", vec![set("header", header)]).build(),
        "a",
        TransformError::HeaderChange,
        "set header",
    )
    .await;
    expect_invalid(
        &h,
        Tx::new().update("a", vec![set("n", json!(1)), splice("header", 0, 0, json!([1]))]).build(),
        "a",
        TransformError::HeaderChange,
        "splice header",
    )
    .await;
    expect_invalid(
        &h,
        Tx::new().insert("b", json!({"x": 1})).update("b", vec![set("header", json!(null))]).build(),
        "b",
        TransformError::HeaderChange,
        "header change of an inserted block",
    )
    .await;
}

/// SPEC 1.1: a splice of a missing field is invalid (a set creates the field).
pub async fn pend_rejects_missing_field(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    let missing = TransformError::MissingField { entity: "nope".into() };
    expect_invalid(
        &h,
        Tx::new().update("a", vec![splice("nope", 0, 0, json!([1]))]).build(),
        "a",
        missing.clone(),
        "splice",
    )
    .await;
    expect_invalid(
        &h,
        Tx::new().update("a", vec![set("n", json!(5)), splice("nope", 0, 0, json!([1]))]).build(),
        "a",
        missing.clone(),
        "second operation",
    )
    .await;
    expect_invalid(
        &h,
        Tx::new().insert("b", json!({"x": 1})).update("b", vec![splice("nope", 0, 0, json!([1]))]).build(),
        "b",
        missing,
        "missing field of the block inserted by the same transform",
    )
    .await;
}

/// SPEC 1.1: a *set* (an operation whose `inserted` is not an array) of a field the block lacks
/// creates it (index and deleteCount ignored), at pend (own-writes read) and at commit, on an
/// existing block and on one inserted by the same transform. A *splice* (`inserted` an array) of a
/// missing field is still invalid, also before a set of it in the same transform.
pub async fn set_creates_a_missing_field(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    let t1 = Tx::new()
        .update(
            "a",
            vec![
                BlockOperation("fresh".into(), 7, 3, json!({"x": [1]})),
                set("nil", json!(null)),
                set("count", json!(1)),
                set("count", json!(2)),
            ],
        )
        .build();
    let created =
        block("a", json!({"items": [1, 2, 3], "name": "x", "n": 0, "fresh": {"x": [1]}, "nil": null, "count": 2}));
    h.pend_ok("t1", Some(2), t1, PendPolicy::Continue).await;
    let own = h
        .get(&["a"], Some(TrxContext { committed: Vec::new(), rev: 1, trx_id: Some(tid("t1")) }))
        .await
        .expect("own-writes read");
    assert_eq!(own.get(&bid("a")).and_then(|r| r.block.clone()), Some(created.clone()), "t1 reads its new fields");
    h.commit_ok("t1", &["a"], 2).await;
    assert_eq!(h.value("a", None).await, Some(created), "the set created the fields");
    assert_eq!(h.value("a", Some(1)).await, Some(block("a", base_fields())), "rev 1 is unchanged");

    // On a block inserted by the same transform.
    h.apply("t2", 1, Tx::new().insert("b", json!({"x": 1})).update("b", vec![set("y", json!("new"))]).build()).await;
    assert_eq!(h.value("b", None).await, Some(block("b", json!({"x": 1, "y": "new"}))));

    // A splice of a missing field is still invalid, before a set of it too.
    let missing = TransformError::MissingField { entity: "nope".into() };
    expect_invalid(
        &h,
        Tx::new().update("a", vec![splice("nope", 0, 0, json!([1]))]).build(),
        "a",
        missing.clone(),
        "splice of a missing field",
    )
    .await;
    expect_invalid(
        &h,
        Tx::new().update("a", vec![splice("nope", 0, 0, json!([1])), set("nope", json!(1))]).build(),
        "a",
        missing,
        "splice of a missing field before a set of it",
    )
    .await;
    h.check_invariants(&["a", "b"], "after sets of missing fields").await;
}

/// SPEC 1.1: a splice of a field that is not an array is invalid.
pub async fn pend_rejects_splice_of_non_array(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    for field in ["name", "n"] {
        expect_invalid(
            &h,
            Tx::new().update("a", vec![splice(field, 0, 0, json!([1]))]).build(),
            "a",
            TransformError::NotAnArray { entity: field.into() },
            &format!("splice of {field}"),
        )
        .await;
    }
}

/// SPEC 1.1: a splice whose index is past the end is invalid; an index equal to the length and a
/// `deleteCount` past the end are valid.
pub async fn pend_rejects_splice_index_past_end(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    for index in [4, 1000, u64::MAX] {
        expect_invalid(
            &h,
            Tx::new().update("a", vec![splice("items", index, 0, json!([9]))]).build(),
            "a",
            TransformError::IndexPastEnd { entity: "items".into(), index, len: 3 },
            &format!("splice at {index}"),
        )
        .await;
    }
    // Index == length appends; deleteCount past the end removes to the end.
    h.apply("t1", 2, Tx::new().update("a", vec![splice("items", 3, 0, json!([4]))]).build()).await;
    assert_eq!(h.value("a", None).await, Some(block("a", json!({"items": [1, 2, 3, 4], "name": "x", "n": 0}))));
    h.apply("t2", 3, Tx::new().update("a", vec![splice("items", 1, u64::MAX, json!(["z"]))]).build()).await;
    assert_eq!(h.value("a", None).await, Some(block("a", json!({"items": [1, "z"], "name": "x", "n": 0}))));
}

/// SPEC 2 pend.1: an update or delete of a block with no `latest` that the same transform does not
/// insert is an error (`unknown block`), even when another trx has a pending insert of it.
pub async fn pend_rejects_unknown_block(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    h.pend_ok("t-ins", None, Tx::new().insert("b", json!({"x": 1})).build(), PendPolicy::Continue).await;
    let ids = ["a", "b", "ghost"];
    let cases = [
        (Tx::new().update("ghost", vec![set("x", json!(1))]).build(), "ghost", "update of an unknown block"),
        (Tx::new().delete("ghost").build(), "ghost", "delete of an unknown block"),
        (Tx::new().update("a", vec![set("n", json!(1))]).delete("ghost").build(), "ghost", "beside a valid update"),
        (Tx::new().update("b", vec![set("x", json!(2))]).build(), "b", "update of a block only pending an insert"),
    ];
    for (transforms, unknown, what) in cases {
        let before = h.snapshot(&ids).await;
        for rev in [None, Some(2)] {
            match h.pend("t-bad", rev, transforms.clone(), PendPolicy::Continue).await {
                Err(RepoError::UnknownBlock(id)) if id == bid(unknown) => {}
                other => panic!("{what}: expected UnknownBlock({unknown}), got {}", describe(&other)),
            }
        }
        assert_eq!(h.snapshot(&ids).await, before, "{what}: nothing may change");
    }
}

/// SPEC 2 pend.1 / commit.4: updating a block that is deleted at `latest` is invalid.
pub async fn pend_rejects_update_of_deleted_block(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    h.apply("t-del", 2, Tx::new().delete("a").build()).await;
    expect_invalid(
        &h,
        Tx::new().update("a", vec![set("n", json!(1))]).build(),
        "a",
        TransformError::BlockAbsent { block_id: bid("a") },
        "update of a deleted block",
    )
    .await;
    // Deleting it again is not an update: it is accepted.
    h.pend_ok("t-del2", None, Tx::new().delete("a").build(), PendPolicy::Continue).await;
}

/// SPEC 2 pend.2: when the blocks moved past `rev`, the answer is stale with `missing`: the
/// committed trxs from `rev` on, each once with its transforms on every block concerned.
pub async fn pend_stale_reports_missing_grouped_per_trx(fixture: Fixture) {
    let h = Harness::new(fixture);
    let t1 = Tx::new().insert("a", json!({"n": 0})).insert("b", json!({"n": 0})).build();
    let t2 = Tx::new().update("a", vec![set("n", json!(2))]).update("b", vec![set("n", json!(2))]).build();
    let t3 = Tx::new().update("a", vec![set("n", json!(3))]).build();
    h.apply("t1", 1, t1.clone()).await;
    h.apply("t2", 2, t2.clone()).await;
    h.apply("t3", 3, t3.clone()).await;

    let t4 = Tx::new().update("a", vec![set("n", json!(4))]).update("b", vec![set("n", json!(4))]).build();
    let before = h.snapshot(&["a", "b"]).await;
    let stale = h.pend_stale("t4", Some(2), t4.clone(), PendPolicy::Continue).await;
    assert_eq!(
        missing_of(&stale),
        vec![("t2".to_owned(), 2, t2.clone()), ("t3".to_owned(), 3, t3.clone())],
        "missing from rev 2 on, t2 once with both blocks"
    );
    assert!(stale.pending.as_ref().is_none_or(Vec::is_empty));
    let stale = h.pend_stale("t4", Some(1), t4.clone(), PendPolicy::Fail).await;
    assert_eq!(
        missing_of(&stale),
        vec![("t1".to_owned(), 1, t1), ("t2".to_owned(), 2, t2), ("t3".to_owned(), 3, t3.clone())]
    );
    let stale = h.pend_stale("t4", Some(3), t4.clone(), PendPolicy::Return).await;
    assert_eq!(missing_of(&stale), vec![("t3".to_owned(), 3, t3)]);
    assert_eq!(h.snapshot(&["a", "b"]).await, before, "a stale pend changes nothing");

    let ok = h.pend_ok("t4", Some(4), t4, PendPolicy::Continue).await;
    assert_eq!(ok.block_ids, vec![bid("a"), bid("b")]);
    assert_eq!(h.pendings("a").await, vec![tid("t4")]);
    assert_eq!(h.pendings("b").await, vec![tid("t4")]);
}

/// SPEC 2 pend.2: the stale check applies when `rev` is given or the block is inserted. An insert
/// of a block that has a `latest` (even deleted) without `rev` is stale; updates without `rev` are
/// not checked.
pub async fn pend_stale_only_when_rev_given_or_inserting(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    let base = Tx::new().insert("a", base_fields()).build();

    h.pend_ok("t1", None, Tx::new().update("a", vec![set("n", json!(1))]).build(), PendPolicy::Continue).await;
    let stale =
        h.pend_stale("t2", None, Tx::new().insert("a", json!({"fresh": 1})).build(), PendPolicy::Continue).await;
    assert_eq!(missing_of(&stale), vec![("t-base".to_owned(), 1, base.clone())], "a re-insert is stale");

    h.cancel("t1", &["a"]).await;
    let del = Tx::new().delete("a").build();
    h.apply("t-del", 2, del.clone()).await;
    let stale =
        h.pend_stale("t3", None, Tx::new().insert("a", json!({"fresh": 1})).build(), PendPolicy::Continue).await;
    assert_eq!(
        missing_of(&stale),
        vec![("t-base".to_owned(), 1, base), ("t-del".to_owned(), 2, del)],
        "a re-insert of a deleted block is stale"
    );
    // With a rev past latest it is not stale: a reader that saw the deletion may re-create the block.
    h.apply("t4", 3, Tx::new().insert("a", json!({"fresh": 1})).build()).await;
    assert_eq!(h.value("a", None).await, Some(block("a", json!({"fresh": 1}))));
}

async fn setup_policy(h: &Harness) -> Transforms {
    with_base_block(h).await;
    h.apply("t-b", 1, Tx::new().insert("b", json!({"n": 0})).build()).await;
    let t1 = Tx::new().update("a", vec![set("n", json!(1))]).build();
    h.pend_ok("t1", Some(2), t1.clone(), PendPolicy::Continue).await;
    t1
}

/// SPEC 2 pend.3-4 policy `c`: pend alongside other pending trxs, listing them (without transforms).
pub async fn pend_policy_continue_pends_alongside(fixture: Fixture) {
    let h = Harness::new(fixture);
    setup_policy(&h).await;
    let ok = h
        .pend_ok(
            "t2",
            Some(2),
            Tx::new().update("a", vec![set("n", json!(2))]).update("b", vec![set("n", json!(2))]).build(),
            PendPolicy::Continue,
        )
        .await;
    assert_eq!(refs(&ok.pending), vec![("a".to_owned(), "t1".to_owned(), None)]);
    assert_eq!(ok.block_ids, vec![bid("a"), bid("b")]);
    assert_eq!(h.pendings("a").await, vec![tid("t1"), tid("t2")]);
    assert_eq!(h.pendings("b").await, vec![tid("t2")]);
    // With nothing else pending, `f` and `r` succeed too.
    let ok = h.pend_ok("t3", None, Tx::new().insert("c", json!({})).build(), PendPolicy::Fail).await;
    assert!(ok.pending.is_empty());
    let ok = h.pend_ok("t4", None, Tx::new().insert("d", json!({})).build(), PendPolicy::Return).await;
    assert!(ok.pending.is_empty());
}

/// SPEC 2 pend.3 policy `f`: fail, listing the other pending trxs per block, storing nothing.
pub async fn pend_policy_fail_lists_pending(fixture: Fixture) {
    let h = Harness::new(fixture);
    setup_policy(&h).await;
    h.pend_ok("t3", None, Tx::new().update("b", vec![set("n", json!(3))]).build(), PendPolicy::Continue).await;
    let before = h.snapshot(&["a", "b"]).await;
    let stale = h
        .pend_stale(
            "t2",
            Some(2),
            Tx::new().update("a", vec![set("n", json!(2))]).update("b", vec![set("n", json!(2))]).build(),
            PendPolicy::Fail,
        )
        .await;
    let mut got = refs(stale.pending.as_deref().unwrap_or_default());
    got.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
    assert_eq!(got, vec![("a".to_owned(), "t1".to_owned(), None), ("b".to_owned(), "t3".to_owned(), None)]);
    assert!(stale.missing.as_ref().is_none_or(Vec::is_empty), "no missing when only pending trxs block");
    assert_eq!(h.snapshot(&["a", "b"]).await, before, "a failed pend stores nothing");
}

/// SPEC 2 pend.3 policy `r`: fail like `f`, including each pending trx's transform.
pub async fn pend_policy_return_includes_transforms(fixture: Fixture) {
    let h = Harness::new(fixture);
    let t1 = setup_policy(&h).await;
    let before = h.snapshot(&["a", "b"]).await;
    let stale =
        h.pend_stale("t2", Some(2), Tx::new().update("a", vec![set("n", json!(2))]).build(), PendPolicy::Return).await;
    assert_eq!(
        refs(stale.pending.as_deref().unwrap_or_default()),
        vec![("a".to_owned(), "t1".to_owned(), Some(t1.transform_for(&bid("a"))))]
    );
    assert_eq!(h.snapshot(&["a", "b"]).await, before, "a failed pend stores nothing");
}

/// SPEC 2 pend.5: pending the same trx with the same transforms again is a no-op success (whatever
/// its policy and rev).
pub async fn pend_same_transforms_again_is_noop(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    let t1 = Tx::new().update("a", vec![splice("items", 0, 1, json!([]))]).insert("b", json!({"k": 1})).build();
    let first = h.pend_ok("t1", Some(2), t1.clone(), PendPolicy::Continue).await;
    h.pend_ok("t0", Some(2), Tx::new().update("a", vec![set("n", json!(9))]).build(), PendPolicy::Continue).await;
    let after_first = h.snapshot(&["a", "b"]).await;
    for (rev, policy) in [(Some(2), PendPolicy::Continue), (None, PendPolicy::Fail), (Some(1), PendPolicy::Return)] {
        let again = h.pend_ok("t1", rev, t1.clone(), policy).await;
        assert_eq!(again.block_ids, first.block_ids);
        assert_eq!(refs(&again.pending), vec![("a".to_owned(), "t0".to_owned(), None)]);
        assert_eq!(h.snapshot(&["a", "b"]).await, after_first, "a re-pend changes nothing");
    }
}

/// SPEC 2 pend.5: pending the same trx with different transforms is an error; nothing changes.
pub async fn pend_different_transforms_is_conflict(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    h.apply("t-b", 1, Tx::new().insert("b", json!({"n": 0})).build()).await;
    let t1 = Tx::new().update("a", vec![set("n", json!(1))]).build();
    h.pend_ok("t1", Some(2), t1, PendPolicy::Continue).await;
    let before = h.snapshot(&["a", "b"]).await;
    let others = [
        Tx::new().update("a", vec![set("n", json!(2))]).build(),
        Tx::new()
            .update("a", vec![set("n", json!(1)), set("n", json!(1))])
            .update("b", vec![set("n", json!(1))])
            .build(),
        Tx::new().update("a", vec![set("n", json!(1))]).delete("a").build(),
        Tx::new().delete("a").build(),
    ];
    for transforms in others {
        match h.pend("t1", Some(2), transforms.clone(), PendPolicy::Continue).await {
            Err(RepoError::TrxConflict { trx_id, block_id }) if trx_id == tid("t1") && block_id == bid("a") => {}
            other => panic!("re-pend with {transforms:?}: expected TrxConflict on a, got {}", describe(&other)),
        }
        assert_eq!(h.snapshot(&["a", "b"]).await, before, "a conflicting re-pend changes nothing");
    }
}

/// A trx committed on a block cannot be pended there again (pending and committed never
/// coexist); nothing changes.
pub async fn pend_of_committed_trx_is_refused(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    let t1 = Tx::new().update("a", vec![set("n", json!(1))]).build();
    h.apply("t1", 2, t1.clone()).await;
    let before = h.snapshot(&["a"]).await;
    for rev in [None, Some(3)] {
        match h.pend("t1", rev, t1.clone(), PendPolicy::Continue).await {
            Err(RepoError::AlreadyCommitted { trx_id, block_id }) if trx_id == tid("t1") && block_id == bid("a") => {}
            other => panic!("pend of a committed trx: expected AlreadyCommitted, got {}", describe(&other)),
        }
    }
    assert_eq!(h.snapshot(&["a"]).await, before);
    h.check_invariants(&["a"], "after refused re-pend").await;
}

/// SPEC 2 cancel: removes the trx's pending records on the listed blocks only; idempotent. A
/// cancelled pending insert leaves the block unknown.
pub async fn cancel_removes_pending_and_is_idempotent(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    h.pend_ok(
        "t1",
        Some(2),
        Tx::new().update("a", vec![set("n", json!(1))]).insert("b", json!({"x": 1})).build(),
        PendPolicy::Continue,
    )
    .await;
    h.pend_ok("t2", Some(2), Tx::new().update("a", vec![set("n", json!(2))]).build(), PendPolicy::Continue).await;

    h.cancel("t1", &["a"]).await;
    assert_eq!(h.pendings("a").await, vec![tid("t2")], "only t1 is cancelled, only on a");
    assert_eq!(h.pendings("b").await, vec![tid("t1")]);
    h.cancel("t1", &["a"]).await;
    assert_eq!(h.pendings("a").await, vec![tid("t2")], "cancel is idempotent");
    h.cancel("t1", &["a", "b", "b"]).await;
    assert_eq!(h.pendings("b").await, Vec::<TrxId>::new());
    let b = h.read_one("b", None).await;
    assert_eq!((b.block, b.state.latest), (None, None), "b is unknown again");
    match h.pend("t3", None, Tx::new().update("b", vec![set("x", json!(2))]).build(), PendPolicy::Continue).await {
        Err(RepoError::UnknownBlock(id)) if id == bid("b") => {}
        other => panic!("update of a block whose pending insert was cancelled: got {}", describe(&other)),
    }
    // After a cancel the trx may pend other transforms.
    h.apply("t1", 2, Tx::new().update("a", vec![set("n", json!(3))]).build()).await;
    assert_eq!(h.value("a", None).await, Some(block("a", json!({"items": [1, 2, 3], "name": "x", "n": 3}))));
    h.check_invariants(&["a", "b"], "after cancels").await;
}

/// SPEC 2 cancel: an unknown trx, an unknown block or a committed trx is not an error, and nothing
/// changes.
pub async fn cancel_unknown_trx_is_ok(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    h.pend_ok("t1", Some(2), Tx::new().update("a", vec![set("n", json!(1))]).build(), PendPolicy::Continue).await;
    let before = h.snapshot(&["a", "ghost"]).await;
    h.cancel("ghost-trx", &["a", "ghost"]).await;
    h.cancel("t-base", &["a"]).await;
    h.cancel("t1", &[]).await;
    assert_eq!(h.snapshot(&["a", "ghost"]).await, before, "cancels of nothing change nothing");
    assert!(h.raw().committed(&bid("a"), &tid("t-base")).await.expect("committed").is_some());
}

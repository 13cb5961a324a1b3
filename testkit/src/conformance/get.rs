//! Rules of SPEC 2 `get`.

use serde_json::json;

use super::Fixture;
use super::support::{Harness, Tx, bid, block, describe, set, splice, tid};
use optimystic_core::error::RepoError;
use optimystic_core::model::{PendPolicy, TrxContext, TrxId, TrxRev};

fn context(rev: u64, committed: &[(&str, u64)], trx: Option<&str>) -> Option<TrxContext> {
    Some(TrxContext {
        committed: committed.iter().map(|(t, r)| TrxRev { trx_id: tid(t), rev: *r }).collect(),
        rev,
        trx_id: trx.map(tid),
    })
}

/// SPEC 2 get.1: duplicate ids are answered once; an unknown id is answered too, without a block.
pub async fn get_duplicate_ids_answered_once(fixture: Fixture) {
    let h = Harness::new(fixture);
    h.apply("t1", 1, Tx::new().insert("a", json!({"n": 1})).insert("b", json!({"n": 2})).build()).await;

    let results = h.get(&["a", "b", "a", "zz", "a", "zz"], None).await.expect("get");
    let keys: Vec<&str> = results.keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["a", "b", "zz"], "one entry per distinct id");
    assert_eq!(results[&bid("a")].block, Some(block("a", json!({"n": 1}))));
    assert_eq!(results[&bid("b")].block, Some(block("b", json!({"n": 2}))));
    let zz = &results[&bid("zz")];
    assert_eq!(zz.block, None, "an unknown block has no value");
    assert_eq!(zz.state.latest, None, "an unknown block has no latest");
    assert!(zz.state.pendings.is_empty(), "an unknown block has no pendings");
}

/// SPEC 2 get.3: the block is omitted when it never existed or is deleted at the revision read.
pub async fn get_omits_unknown_and_deleted_blocks(fixture: Fixture) {
    let h = Harness::new(fixture);
    let unknown = h.read_one("never", None).await;
    assert_eq!(unknown.block, None);
    assert_eq!(unknown.state.latest, None);

    h.apply("t1", 1, Tx::new().insert("a", json!({"n": 1})).build()).await;
    h.apply("t2", 2, Tx::new().update("a", vec![set("n", json!(2))]).build()).await;
    h.apply("t3", 3, Tx::new().delete("a").build()).await;

    let deleted = h.read_one("a", None).await;
    assert_eq!(deleted.block, None, "a deleted block is omitted at latest");
    assert_eq!(deleted.state.latest, Some(TrxRev { trx_id: tid("t3"), rev: 3 }), "a deleted block keeps its latest");
    assert_eq!(h.value("a", Some(0)).await, None, "before its creation the block does not exist");
    assert_eq!(h.value("a", Some(1)).await, Some(block("a", json!({"n": 1}))), "it existed at rev 1");
    assert_eq!(h.value("a", Some(2)).await, Some(block("a", json!({"n": 2}))), "and until its deletion");
    assert_eq!(h.value("a", Some(3)).await, None, "deleted at rev 3");
    assert_eq!(h.value("a", Some(500)).await, None, "deleted after rev 3");
    // Another block created later in the store's life also starts at its revision 1.
    h.apply("u1", 1, Tx::new().insert("b", json!({"n": 1})).build()).await;
    assert_eq!(h.value("b", Some(0)).await, None, "b before its creation");
    assert_eq!(h.value("b", Some(3)).await, Some(block("b", json!({"n": 1}))), "b after its creation");
    h.check_invariants(&["a", "b"], "after delete").await;
}

/// SPEC 2 get.3: the block is read at `context.rev` (the newest revision at or before it), else at
/// `latest`; a `context.rev` past `latest` reads `latest`.
pub async fn get_reads_at_context_rev(fixture: Fixture) {
    let h = Harness::new(fixture);
    h.apply("t1", 1, Tx::new().insert("a", json!({"n": 1})).build()).await;
    h.apply("t2", 2, Tx::new().update("a", vec![set("n", json!(2))]).build()).await;
    h.apply("t3", 3, Tx::new().update("a", vec![set("m", json!(3))]).build()).await;
    h.apply("t4", 4, Tx::new().update("a", vec![set("n", json!(4))]).build()).await;

    let expected = [
        None,
        Some(json!({"n": 1})),
        Some(json!({"n": 2})),
        Some(json!({"n": 2, "m": 3})),
        Some(json!({"n": 4, "m": 3})),
        Some(json!({"n": 4, "m": 3})),
        Some(json!({"n": 4, "m": 3})),
    ];
    for (rev, fields) in expected.iter().enumerate() {
        let got = h.read_one("a", Some(rev as u64)).await;
        assert_eq!(got.block, fields.clone().map(|f| block("a", f)), "value of a at context.rev {rev}");
        assert_eq!(
            got.state.latest,
            Some(TrxRev { trx_id: tid("t4"), rev: 4 }),
            "state.latest does not depend on the revision read"
        );
    }
    let newest = Some(block("a", json!({"n": 4, "m": 3})));
    assert_eq!(h.value("a", None).await, newest, "no context reads latest");
    assert_eq!(h.value("a", Some(u64::MAX)).await, newest, "a huge context.rev reads latest");
}

/// SPEC 2 get.2: with a context, every reported committed trx newer than `latest` and pending here
/// is committed first, in ascending rev order (whatever the order of the report); others are
/// ignored.
pub async fn get_promotes_reported_commits_in_rev_order(fixture: Fixture) {
    let h = Harness::new(fixture);
    h.apply("t0", 1, Tx::new().insert("a", json!({"items": [], "n": 0})).build()).await;
    h.pend_ok(
        "t1",
        Some(2),
        Tx::new().update("a", vec![splice("items", 0, 0, json!(["t1"]))]).build(),
        PendPolicy::Continue,
    )
    .await;
    h.pend_ok("t2", Some(3), Tx::new().update("a", vec![set("n", json!(3))]).build(), PendPolicy::Continue).await;
    h.pend_ok("t4", Some(4), Tx::new().update("a", vec![set("n", json!(4))]).build(), PendPolicy::Continue).await;

    // Reported out of order, with an unknown trx, an old revision and t4 at a revision not newer
    // than latest.
    let ctx = context(3, &[("t2", 3), ("ghost", 9), ("t1", 2), ("t0", 1), ("t4", 1)], None);
    let results = h.get(&["a"], ctx).await.expect("get with promotion");
    let a = &results[&bid("a")];
    assert_eq!(
        a.state.latest,
        Some(TrxRev { trx_id: tid("t2"), rev: 3 }),
        "t1 (rev 2) then t2 (rev 3) must be promoted in ascending rev order"
    );
    assert_eq!(a.block, Some(block("a", json!({"items": ["t1"], "n": 3}))), "the read sees both promotions");
    assert_eq!(a.state.pendings, vec![tid("t4")], "t4 reported at rev 1 <= latest is not promoted");
    let log = h.raw().revisions(&bid("a"), 0, u64::MAX).await.expect("revisions");
    assert_eq!(
        log,
        vec![
            TrxRev { trx_id: tid("t0"), rev: 1 },
            TrxRev { trx_id: tid("t1"), rev: 2 },
            TrxRev { trx_id: tid("t2"), rev: 3 },
        ]
    );
    assert_eq!(h.raw().committed(&bid("a"), &tid("ghost")).await.expect("committed"), None);

    // A pending insert of a new block is promoted too (at revision 1: revisions are contiguous).
    h.pend_ok("t3", None, Tx::new().insert("b", json!({"k": true})).build(), PendPolicy::Continue).await;
    let results = h.get(&["b"], context(7, &[("t3", 1)], None)).await.expect("get b");
    let b = &results[&bid("b")];
    assert_eq!(b.state.latest, Some(TrxRev { trx_id: tid("t3"), rev: 1 }));
    assert_eq!(b.block, Some(block("b", json!({"k": true}))));
    assert!(b.state.pendings.is_empty());

    // Without a reported commit nothing is promoted.
    let results = h.get(&["a"], context(9, &[], None)).await.expect("get a");
    assert_eq!(results[&bid("a")].state.pendings, vec![tid("t4")]);

    // A reported commit that would leave a revision gap (SPEC 2 item 7) is not promoted.
    let before = h.snapshot(&["a"]).await;
    let results = h.get(&["a"], context(9, &[("t4", 5)], None)).await.expect("get a with a gap");
    let a = &results[&bid("a")];
    assert_eq!(a.state.latest, Some(TrxRev { trx_id: tid("t2"), rev: 3 }), "t4 at rev 5 is not promoted over rev 3");
    assert_eq!(a.state.pendings, vec![tid("t4")]);
    assert_eq!(h.snapshot(&["a"]).await, before, "a gapped report changes nothing");
    h.check_invariants(&["a", "b"], "after promotion").await;
}

/// SPEC 2 get.4: with `context.trxId` the read includes that pending trx's transform (update,
/// insert of a new block, delete).
pub async fn get_reads_own_pending_writes(fixture: Fixture) {
    let h = Harness::new(fixture);
    h.apply("t0", 1, Tx::new().insert("a", json!({"items": [1], "n": 0})).build()).await;
    h.pend_ok(
        "t1",
        Some(2),
        Tx::new().update("a", vec![splice("items", 1, 0, json!([2])), set("n", json!(7))]).build(),
        PendPolicy::Continue,
    )
    .await;
    h.pend_ok("t2", None, Tx::new().insert("b", json!({"new": true})).build(), PendPolicy::Continue).await;
    h.pend_ok("t3", None, Tx::new().delete("a").build(), PendPolicy::Continue).await;

    let own = h.get(&["a"], context(1, &[], Some("t1"))).await.expect("own read");
    assert_eq!(own.get(&bid("a")).and_then(|r| r.block.clone()), Some(block("a", json!({"items": [1, 2], "n": 7}))));
    assert_eq!(h.value("a", Some(1)).await, Some(block("a", json!({"items": [1], "n": 0}))), "others do not see it");

    let own = h.get(&["b"], context(1, &[], Some("t2"))).await.expect("own read of a pending insert");
    assert_eq!(own.get(&bid("b")).and_then(|r| r.block.clone()), Some(block("b", json!({"new": true}))));
    assert_eq!(h.value("b", None).await, None, "a pending insert is invisible to others");

    let own = h.get(&["a"], context(1, &[], Some("t3"))).await.expect("own read of a pending delete");
    assert_eq!(own.get(&bid("a")).and_then(|r| r.block.clone()), None, "a pending delete hides the block from its trx");
    assert!(h.value("a", None).await.is_some());
}

/// SPEC 2 get.4: reading a trx's own writes is an error on a block where it is not pending
/// (never pended, or already committed).
pub async fn get_own_writes_require_pending_trx(fixture: Fixture) {
    let h = Harness::new(fixture);
    h.apply("t0", 1, Tx::new().insert("a", json!({"n": 0})).insert("b", json!({"n": 0})).build()).await;
    h.pend_ok("t1", Some(2), Tx::new().update("a", vec![set("n", json!(1))]).build(), PendPolicy::Continue).await;

    let expect_not_found = |result: Result<_, RepoError>, trx: &str, block_id: &str, what: &str| match result {
        Err(RepoError::PendingNotFound { trx_id, block_id: b }) if trx_id == tid(trx) && b == bid(block_id) => {}
        other => panic!("{what}: expected PendingNotFound {trx} on {block_id}, got {}", describe(&other)),
    };
    expect_not_found(h.get(&["a", "b"], context(1, &[], Some("t1"))).await, "t1", "b", "t1 is not pending on b");
    expect_not_found(h.get(&["a"], context(1, &[], Some("ghost"))).await, "ghost", "a", "unknown trx");
    h.commit_ok("t1", &["a"], 2).await;
    expect_not_found(h.get(&["a"], context(2, &[], Some("t1"))).await, "t1", "a", "t1 is committed, not pending");
}

/// SPEC 2 get.5: `state` reports `latest` and the sorted ids of the pending transactions.
pub async fn get_reports_latest_and_pendings(fixture: Fixture) {
    let h = Harness::new(fixture);
    h.apply("t0", 1, Tx::new().insert("a", json!({"n": 0})).build()).await;
    h.pend_ok("t2", Some(2), Tx::new().update("a", vec![set("n", json!(2))]).build(), PendPolicy::Continue).await;
    h.pend_ok("t1", Some(2), Tx::new().update("a", vec![set("n", json!(1))]).build(), PendPolicy::Continue).await;
    h.pend_ok("t3", None, Tx::new().insert("new", json!({})).build(), PendPolicy::Continue).await;

    let results = h.get(&["a", "new"], None).await.expect("get");
    let a = &results[&bid("a")];
    assert_eq!(a.state.latest, Some(TrxRev { trx_id: tid("t0"), rev: 1 }));
    assert_eq!(a.state.pendings, vec![tid("t1"), tid("t2")], "pendings, sorted");
    let new = &results[&bid("new")];
    assert_eq!(new.state.latest, None, "a block only pending an insert has no latest");
    assert_eq!(new.state.pendings, vec![tid("t3")]);
    assert_eq!(new.block, None);

    h.cancel("t1", &["a"]).await;
    assert_eq!(h.read_one("a", None).await.state.pendings, vec![tid("t2")]);
    h.commit_ok("t2", &["a"], 2).await;
    let a = h.read_one("a", None).await;
    assert_eq!(a.state.latest, Some(TrxRev { trx_id: tid("t2"), rev: 2 }));
    assert_eq!(a.state.pendings, Vec::<TrxId>::new());
}

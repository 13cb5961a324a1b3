//! Rules of SPEC 2 `commit`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::Fixture;
use super::support::{
    Harness, Tx, assert_invalid, bid, block, describe, missing_of, set, splice, tid, with_base_block,
};
use optimystic_core::error::{RepoError, TransformError};
use optimystic_core::model::{CommitResult, PendPolicy, TrxRev};
use optimystic_core::storage::CommittedTransform;

/// How long a group of concurrent commits may take before the rule calls it a deadlock.
const DEADLOCK_TIMEOUT: Duration = Duration::from_secs(120);

/// SPEC 2 commit.5: the pending transform becomes committed at `rev` on every block: value,
/// revision log, committed transform, `latest`; the trx is no longer pending there. A new block
/// starts at revision 1 (SPEC 2 item 7), so the multi-block commit here updates `a` and `b`, both
/// at revision 1, and a commit of inserts creates two blocks at once.
pub async fn commit_applies_pending_transform(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    h.apply("t-b", 1, Tx::new().insert("b", json!({"k": "v0"})).build()).await;
    let t1 = Tx::new()
        .update("a", vec![splice("items", 1, 1, json!(["two", "deux"])), set("name", json!({"nested": [null]}))])
        .update("b", vec![set("k", json!("v")), set("added", json!({"new": true}))])
        .build();
    h.pend_ok("t1", Some(2), t1.clone(), PendPolicy::Continue).await;
    h.pend_ok("t2", Some(2), Tx::new().update("a", vec![set("n", json!(2))]).build(), PendPolicy::Continue).await;
    h.commit_ok("t1", &["b", "a"], 2).await;

    let expected_a = block("a", json!({"items": [1, "two", "deux", 3], "name": {"nested": [null]}, "n": 0}));
    assert_eq!(h.value("a", None).await, Some(expected_a));
    assert_eq!(h.value("b", None).await, Some(block("b", json!({"k": "v", "added": {"new": true}}))));
    assert_eq!(h.value("b", Some(1)).await, Some(block("b", json!({"k": "v0"}))), "rev 1 of b is unchanged");
    for id in ["a", "b"] {
        let block_id = bid(id);
        assert_eq!(h.latest(id).await, Some(TrxRev { trx_id: tid("t1"), rev: 2 }), "latest of {id}");
        assert_eq!(
            h.raw().committed(&block_id, &tid("t1")).await.expect("committed"),
            Some(CommittedTransform { rev: 2, transform: t1.transform_for(&block_id) }),
            "committed transform of t1 on {id}"
        );
        assert_eq!(
            h.raw().pending(&block_id, &tid("t1")).await.expect("pending"),
            None,
            "t1 no longer pending on {id}"
        );
        let log = h.raw().revisions(&block_id, 2, 2).await.expect("revisions");
        assert_eq!(log, vec![TrxRev { trx_id: tid("t1"), rev: 2 }]);
    }
    assert_eq!(h.pendings("a").await, vec![tid("t2")], "other pending trxs stay");
    assert_eq!(h.value("a", Some(1)).await, Some(block("a", super::support::base_fields())), "rev 1 is unchanged");
    h.check_invariants(&["a", "b"], "after commit").await;

    // Inserts of new blocks in one trx: both at revision 1.
    let t3 = Tx::new().insert("c", json!({"k": 1})).insert("d", json!({"k": 2})).build();
    h.pend_ok("t3", Some(1), t3.clone(), PendPolicy::Continue).await;
    h.commit_ok("t3", &["d", "c"], 1).await;
    for (id, k) in [("c", 1), ("d", 2)] {
        assert_eq!(h.value(id, None).await, Some(block(id, json!({"k": k}))), "value of {id}");
        assert_eq!(h.latest(id).await, Some(TrxRev { trx_id: tid("t3"), rev: 1 }), "latest of {id}");
        assert_eq!(
            h.raw().committed(&bid(id), &tid("t3")).await.expect("committed"),
            Some(CommittedTransform { rev: 1, transform: t3.transform_for(&bid(id)) }),
            "committed transform of t3 on {id}"
        );
    }
    h.check_invariants(&["a", "b", "c", "d"], "after inserts").await;
}

/// SPEC 2 commit.1: concurrent commits over the same blocks, listed in different orders, never
/// deadlock; at one revision exactly one wins, the others are stale.
pub async fn commit_concurrent_multi_block_commits_do_not_deadlock(fixture: Fixture) {
    let h = Arc::new(Harness::new(fixture));
    let ids = ["a", "b", "c", "d"];
    h.apply(
        "t0",
        1,
        Tx::new()
            .insert("a", json!({"n": 0}))
            .insert("b", json!({"n": 0}))
            .insert("c", json!({"n": 0}))
            .insert("d", json!({"n": 0}))
            .build(),
    )
    .await;
    let trxs: Vec<String> = (0..8).map(|i| format!("t{}", i + 1)).collect();
    for (i, trx) in trxs.iter().enumerate() {
        let mut tx = Tx::new();
        for id in ids {
            tx = tx.update(id, vec![set("n", json!(i + 1))]);
        }
        h.pend_ok(trx, Some(2), tx.build(), PendPolicy::Continue).await;
    }
    let orders = |i: usize| -> Vec<&'static str> {
        let mut order: Vec<&'static str> = ids.to_vec();
        order.rotate_left(i % ids.len());
        if i % 2 == 1 {
            order.reverse();
        }
        order
    };

    // Round 1: everyone at rev 2; exactly one wins.
    let mut tasks = Vec::new();
    for (i, trx) in trxs.iter().cloned().enumerate() {
        let h = h.clone();
        let order = orders(i);
        tasks.push(tokio::spawn(async move { (trx.clone(), h.commit(&trx, &order, 2).await) }));
    }
    let results = tokio::time::timeout(DEADLOCK_TIMEOUT, futures::future::join_all(tasks))
        .await
        .expect("concurrent commits deadlocked");
    let mut winners = Vec::new();
    for joined in results {
        let (trx, result) = joined.expect("commit task panicked");
        match result {
            Ok(CommitResult::Success(_)) => winners.push(trx),
            Ok(CommitResult::Stale(stale)) => {
                let missing = missing_of(&stale);
                assert_eq!(missing.len(), 1, "{trx}: one trx is missing: {missing:?}");
            }
            Err(e) => panic!("{trx}: commit must succeed or be stale, got {e:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one commit wins rev 2: {winners:?}");
    let winner = &winners[0];
    for id in ids {
        assert_eq!(h.latest(id).await, Some(TrxRev { trx_id: tid(winner), rev: 2 }), "every block is at the winner");
    }

    // Round 2: the losers at distinct revisions, concurrently. Revisions are contiguous (SPEC 2
    // item 7): a commit at r lands only once r - 1 has, else it is a revision gap (or stale once a
    // later one landed). Every trx lands on all blocks or none, and the revisions that landed are
    // exactly 3, 4, ... with no hole.
    let mut tasks = Vec::new();
    for (i, trx) in trxs.iter().cloned().enumerate().filter(|(_, t)| t != winner) {
        let h = h.clone();
        let order = orders(i + 1);
        let rev = 3 + i as u64;
        tasks.push(tokio::spawn(async move { (trx.clone(), rev, h.commit(&trx, &order, rev).await) }));
    }
    let results = tokio::time::timeout(DEADLOCK_TIMEOUT, futures::future::join_all(tasks))
        .await
        .expect("concurrent commits deadlocked");
    let mut landed = Vec::new();
    for joined in results {
        let (trx, rev, result) = joined.expect("commit task panicked");
        let committed = match result {
            Ok(CommitResult::Success(_)) => true,
            Ok(CommitResult::Stale(_)) => false,
            Err(RepoError::BadRequest(message)) if message.contains("revision gap") => false,
            Err(e) => panic!("{trx}: commit must succeed, be stale or be a revision gap, got {e:?}"),
        };
        if committed {
            landed.push(rev);
        }
        for id in ids {
            let got = h.raw().committed(&bid(id), &tid(&trx)).await.expect("committed").map(|c| c.rev);
            assert_eq!(got, committed.then_some(rev), "{trx} on {id}: committed on every block or none");
        }
    }
    landed.sort_unstable();
    let newest = 2 + landed.len() as u64;
    assert_eq!(landed, (3..=newest).collect::<Vec<_>>(), "the revisions that landed are contiguous");
    for id in ids {
        assert_eq!(h.latest(id).await.map(|l| l.rev), Some(newest), "latest of {id}");
    }
    h.check_invariants(&ids, "after concurrent commits").await;
}

/// SPEC 2 commit.2: committing the same `{trxId, rev}` again is a no-op success: right after, after
/// later commits on the block, and as a retry that completes a commit done on some blocks only.
pub async fn commit_again_is_idempotent(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    h.apply("t-b", 1, Tx::new().insert("b", json!({"n": 0})).build()).await;
    h.pend_ok("t1", Some(2), Tx::new().update("a", vec![set("n", json!(1))]).build(), PendPolicy::Continue).await;
    h.commit_ok("t1", &["a"], 2).await;
    let once = h.snapshot(&["a", "b"]).await;
    h.commit_ok("t1", &["a"], 2).await;
    h.commit_ok("t1", &["a", "a"], 2).await;
    assert_eq!(h.snapshot(&["a", "b"]).await, once, "a re-commit changes nothing");

    // After a later commit on the block, a re-delivered commit of t1 is still a no-op success.
    h.apply("t1-b", 2, Tx::new().update("b", vec![set("n", json!(1))]).build()).await;
    h.apply("t2", 3, Tx::new().update("a", vec![set("n", json!(2))]).update("b", vec![set("n", json!(2))]).build())
        .await;
    let later = h.snapshot(&["a", "b"]).await;
    h.commit_ok("t1", &["a"], 2).await;
    assert_eq!(h.snapshot(&["a", "b"]).await, later);

    // A commit interrupted after its first block is completed by a retry, even once another trx
    // moved the committed block on.
    let t3 = Tx::new().update("a", vec![set("n", json!(3))]).update("b", vec![set("n", json!(3))]).build();
    h.pend_ok("t3", Some(4), t3, PendPolicy::Continue).await;
    h.commit_ok("t3", &["a"], 4).await;
    h.apply("t4", 5, Tx::new().update("a", vec![set("n", json!(4))]).build()).await;
    h.commit_ok("t3", &["a", "b"], 4).await;
    assert_eq!(h.latest("b").await, Some(TrxRev { trx_id: tid("t3"), rev: 4 }));
    assert_eq!(h.value("b", None).await, Some(block("b", json!({"n": 3}))));
    assert_eq!(h.latest("a").await, Some(TrxRev { trx_id: tid("t4"), rev: 5 }));
    h.check_invariants(&["a", "b"], "after re-commits").await;
}

/// SPEC 2 commit.2: a block at or past `rev` with other trxs gives a stale answer with `missing` =
/// the committed trxs from `rev` on, each once with its transforms on every block; nothing changes.
pub async fn commit_stale_reports_missing_from_rev(fixture: Fixture) {
    let h = Harness::new(fixture);
    let t0 = Tx::new().insert("a", json!({"n": 0})).insert("b", json!({"n": 0})).build();
    let t1 = Tx::new().update("a", vec![set("n", json!(1))]).update("b", vec![set("n", json!(1))]).build();
    let t2 = Tx::new().update("a", vec![set("n", json!(2))]).build();
    h.apply("t0", 1, t0).await;
    h.apply("t1", 2, t1.clone()).await;
    h.apply("t2", 3, t2.clone()).await;
    h.pend_ok(
        "t3",
        None,
        Tx::new().update("a", vec![set("n", json!(3))]).update("b", vec![set("n", json!(3))]).build(),
        PendPolicy::Continue,
    )
    .await;
    let before = h.snapshot(&["a", "b"]).await;

    let stale = h.commit_stale("t3", &["a", "b"], 2).await;
    assert_eq!(missing_of(&stale), vec![("t1".to_owned(), 2, t1), ("t2".to_owned(), 3, t2.clone())]);
    let stale = h.commit_stale("t3", &["b", "a"], 3).await;
    assert_eq!(missing_of(&stale), vec![("t2".to_owned(), 3, t2)]);
    assert_eq!(h.snapshot(&["a", "b"]).await, before, "a stale commit changes nothing");

    // Stale on one block only: nothing is committed on the other either.
    let stale = h.commit_stale("t3", &["a", "b"], 3).await;
    assert!(!missing_of(&stale).is_empty());
    assert_eq!(h.latest("b").await, Some(TrxRev { trx_id: tid("t1"), rev: 2 }));

    // Once b is at 3 too, t3 commits at 4 on both (revisions are contiguous, SPEC 2 item 7).
    h.apply("t2-b", 3, Tx::new().update("b", vec![set("n", json!(2))]).build()).await;
    h.commit_ok("t3", &["a", "b"], 4).await;
    assert_eq!(h.value("b", None).await, Some(block("b", json!({"n": 3}))));
    h.check_invariants(&["a", "b"], "after stale commits").await;
}

/// SPEC 2 commit.3: the trx must be pending on every block not already at `rev`, else an error
/// naming the trx and the block; nothing changes on any block. Staleness (step 2) is reported
/// before this error.
pub async fn commit_without_pending_is_error(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    h.apply("t-b", 1, Tx::new().insert("b", json!({"n": 0})).build()).await;
    h.pend_ok("t1", Some(2), Tx::new().update("a", vec![set("n", json!(1))]).build(), PendPolicy::Continue).await;
    let before = h.snapshot(&["a", "b", "ghost"]).await;
    let expect = |result: Result<CommitResult, RepoError>, trx: &str, block_id: &str, what: &str| match result {
        Err(RepoError::PendingNotFound { trx_id, block_id: b }) if trx_id == tid(trx) && b == bid(block_id) => {}
        other => panic!("{what}: expected PendingNotFound {trx} on {block_id}, got {}", describe(&other)),
    };
    expect(h.commit("ghost", &["a"], 2).await, "ghost", "a", "unknown trx");
    expect(h.commit("t1", &["a", "b"], 2).await, "t1", "b", "t1 pending on a only");
    // An unknown block is at revision 0: only a commit at 1 is not a revision gap there.
    expect(h.commit("t1", &["ghost"], 1).await, "t1", "ghost", "unknown block");
    assert_eq!(h.snapshot(&["a", "b", "ghost"]).await, before, "a failed commit changes nothing");

    // A trx committed at another revision is not pending any more: the commit at the next
    // revision does not succeed and changes nothing. SPEC 2 commit.3 asks for the
    // pending-not-found error; a stale answer whose `missing` names the trx at the revision it is
    // committed at is accepted as well (StorageRepo answers so, as a cluster member must not take
    // this case for being behind).
    h.commit_ok("t1", &["a"], 2).await;
    let before = h.snapshot(&["a", "b"]).await;
    match h.commit("t1", &["a"], 3).await {
        Err(RepoError::PendingNotFound { trx_id, block_id }) if trx_id == tid("t1") && block_id == bid("a") => {}
        Ok(CommitResult::Stale(stale)) if missing_of(&stale).iter().any(|m| m.0 == "t1" && m.1 == 2) => {}
        other => panic!(
            "t1 committed at rev 2, committed again at 3: expected PendingNotFound t1 on a (or stale naming t1 at \
             2), got {}",
            describe(&other)
        ),
    }
    assert_eq!(h.snapshot(&["a", "b"]).await, before, "a failed re-commit changes nothing");
    // ...and a commit at or below latest is stale before anything else.
    let stale = h.commit_stale("t1", &["a"], 1).await;
    assert_eq!(
        missing_of(&stale).iter().map(|m| (m.0.clone(), m.1)).collect::<Vec<_>>(),
        [("t-base".to_owned(), 1), ("t1".to_owned(), 2)]
    );
    let stale = h.commit_stale("ghost", &["b", "a"], 2).await;
    assert_eq!(missing_of(&stale).len(), 1, "stale on a is reported before ghost is found not pending on b");
}

/// SPEC 2 commit.4: when one block's transform no longer applies at `latest` (splice past the end,
/// update of a deleted block), the whole commit fails with an error and no block changes.
pub async fn commit_is_all_or_nothing(fixture: Fixture) {
    let h = Harness::new(fixture);
    with_base_block(&h).await;
    h.apply("t-b", 1, Tx::new().insert("b", json!({"items": [1, 2, 3]})).build()).await;
    // t1 appends at index 3 of b; t2 then empties b's items.
    h.pend_ok(
        "t1",
        Some(3),
        Tx::new().update("a", vec![set("n", json!(1))]).update("b", vec![splice("items", 3, 0, json!([4]))]).build(),
        PendPolicy::Continue,
    )
    .await;
    h.pend_ok(
        "t2",
        Some(2),
        Tx::new().update("a", vec![set("n", json!(2))]).update("b", vec![splice("items", 0, 3, json!([]))]).build(),
        PendPolicy::Continue,
    )
    .await;
    h.commit_ok("t2", &["a", "b"], 2).await;
    let before = h.snapshot(&["a", "b"]).await;
    let result = h.commit("t1", &["a", "b"], 3).await;
    assert_invalid(
        &result,
        "b",
        &TransformError::IndexPastEnd { entity: "items".into(), index: 3, len: 0 },
        "splice past the end at commit",
    );
    assert_eq!(h.snapshot(&["a", "b"]).await, before, "nothing changes on a either");

    // An update of a block deleted meanwhile.
    h.pend_ok(
        "t3",
        Some(4),
        Tx::new().update("b", vec![set("items", json!("x"))]).update("a", vec![set("n", json!(3))]).build(),
        PendPolicy::Continue,
    )
    .await;
    h.pend_ok("t4", Some(3), Tx::new().update("a", vec![set("n", json!(4))]).delete("b").build(), PendPolicy::Continue)
        .await;
    h.commit_ok("t4", &["a", "b"], 3).await;
    let before = h.snapshot(&["a", "b"]).await;
    let result = h.commit("t3", &["a", "b"], 4).await;
    assert_invalid(
        &result,
        "b",
        &TransformError::BlockAbsent { block_id: bid("b") },
        "update of a deleted block at commit",
    );
    assert_eq!(h.snapshot(&["a", "b"]).await, before, "nothing changes on a either");
    assert_eq!(h.pendings("a").await, vec![tid("t1"), tid("t3")], "the failed trxs stay pending");
    h.check_invariants(&["a", "b"], "after failed commits").await;
}

/// Asserts that `result` is the `bad-request` of a revision gap on `block` (SPEC 2 item 7).
#[track_caller]
fn assert_gap(result: &Result<CommitResult, RepoError>, block: &str, what: &str) {
    match result {
        Err(RepoError::BadRequest(message)) if message.contains(&format!("revision gap on {block}")) => {}
        other => panic!("{what}: expected a revision gap on {block} (bad request), got {}", describe(other)),
    }
}

/// SPEC 2 item 7: revisions are contiguous. A commit at `rev` applies only on blocks at `rev - 1`
/// (a block with no `latest` counts as 0); a commit at a revision past that is a revision gap: a
/// `bad-request` error, and nothing changes on any block, also in a multi-block commit where only
/// one block is behind. The trx stays pending and commits once its blocks are at `rev - 1`.
pub async fn commit_with_a_revision_gap_is_refused_and_changes_nothing(fixture: Fixture) {
    let h = Harness::new(fixture);
    let ids = ["a", "b", "c"];
    with_base_block(&h).await;

    // One block at 1, a commit at 3. (A single node's pend has no gap rule.)
    h.pend_ok("t1", Some(3), Tx::new().update("a", vec![set("n", json!(1))]).build(), PendPolicy::Continue).await;
    let before = h.snapshot(&ids).await;
    assert_gap(&h.commit("t1", &["a"], 3).await, "a", "a at 1, commit at 3");
    assert_gap(&h.commit("t1", &["a"], 9).await, "a", "a at 1, commit at 9");
    assert_eq!(h.snapshot(&ids).await, before, "a refused commit changes nothing");
    assert_eq!(h.pendings("a").await, vec![tid("t1")], "the trx stays pending");
    h.commit_ok("t1", &["a"], 2).await;
    assert_eq!(h.latest("a").await, Some(TrxRev { trx_id: tid("t1"), rev: 2 }));

    // Several blocks, one behind: a at 2, b at 1. Nothing changes on a either, whatever the order.
    h.apply("t-b", 1, Tx::new().insert("b", json!({"n": 0})).build()).await;
    let t2 = Tx::new().update("a", vec![set("n", json!(2))]).update("b", vec![set("n", json!(2))]).build();
    h.pend_ok("t2", Some(3), t2, PendPolicy::Continue).await;
    let before = h.snapshot(&ids).await;
    assert_gap(&h.commit("t2", &["a", "b"], 3).await, "b", "a at 2, b at 1, commit at 3");
    assert_gap(&h.commit("t2", &["b", "a"], 3).await, "b", "the same, ids in the other order");
    assert_eq!(h.snapshot(&ids).await, before, "a refused multi-block commit changes nothing on any block");

    // A new block (no `latest`: revision 0) beside a block at 2.
    let t3 = Tx::new().update("a", vec![set("n", json!(3))]).insert("c", json!({"k": 1})).build();
    h.pend_ok("t3", Some(3), t3, PendPolicy::Continue).await;
    let before = h.snapshot(&ids).await;
    assert_gap(&h.commit("t3", &["a", "c"], 3).await, "c", "a new block beside a block at 2");
    assert_eq!(h.snapshot(&ids).await, before, "nothing changes on a, c stays unknown");
    assert_eq!(h.latest("c").await, None);
    h.cancel("t3", &["a", "c"]).await;

    // Once b is at 2, t2 commits at 3 on both.
    h.apply("t-b2", 2, Tx::new().update("b", vec![set("n", json!(1))]).build()).await;
    h.commit_ok("t2", &["b", "a"], 3).await;
    for id in ["a", "b"] {
        assert_eq!(h.latest(id).await, Some(TrxRev { trx_id: tid("t2"), rev: 3 }), "latest of {id}");
        let log = h.raw().revisions(&bid(id), 0, u64::MAX).await.expect("revisions");
        let revs: Vec<u64> = log.iter().map(|e| e.rev).collect();
        assert_eq!(revs, vec![1, 2, 3], "revisions of {id} are contiguous");
    }
    h.check_invariants(&ids, "after revision gaps").await;
}

/// SPEC 2 commit.6: after every step of a mixed sequence, `latest.rev` never decreased, no trx is
/// both pending and committed on a block, and `latest` can be materialized. Each step commits at
/// the next revision of the blocks it touches; when they are at different revisions the commit is
/// a revision gap (SPEC 2 item 7), refused without changing anything, and the trx is cancelled.
pub async fn commit_keeps_invariants(fixture: Fixture) {
    let h = Harness::new(fixture);
    let ids = ["a", "b", "c"];
    h.check_invariants(&ids, "empty store").await;
    h.apply("t0", 1, Tx::new().insert("a", json!({"l": []})).insert("b", json!({"l": []})).build()).await;
    h.check_invariants(&ids, "after t0").await;
    let (mut commits, mut gaps) = (0, 0);
    for step in 0..12u64 {
        let trx = format!("s{step}");
        let tx = match step % 4 {
            0 => Tx::new().update("a", vec![splice("l", 0, 0, json!([step]))]),
            1 => Tx::new()
                .update("a", vec![splice("l", 0, 1, json!([]))])
                .update("b", vec![splice("l", 0, 0, json!([step]))]),
            2 => Tx::new().insert("c", json!({"l": [step]})),
            _ => Tx::new().update("b", vec![set("l", json!([]))]),
        };
        let transforms = tx.build();
        let touched: Vec<String> = transforms.block_ids().iter().map(|b| b.to_string()).collect();
        let touched: Vec<&str> = touched.iter().map(String::as_str).collect();
        let mut revs = Vec::new();
        for id in &touched {
            revs.push(h.latest(id).await.map_or(0, |l| l.rev));
        }
        let rev = revs.iter().max().copied().unwrap_or(0) + 1;
        let aligned = revs.iter().all(|r| *r + 1 == rev);
        match h.pend(&trx, Some(rev), transforms, PendPolicy::Continue).await {
            Ok(optimystic_core::model::PendResult::Success(_)) => {}
            Ok(optimystic_core::model::PendResult::Stale(_)) => {
                h.check_invariants(&ids, &format!("after stale pend {trx}")).await;
                continue;
            }
            Err(e) => panic!("pend {trx} on {touched:?}: {e}"),
        }
        h.check_invariants(&ids, &format!("after pend {trx}")).await;
        if step % 5 == 4 {
            h.cancel(&trx, &touched).await;
            h.check_invariants(&ids, &format!("after cancel {trx}")).await;
            continue;
        }
        if !aligned {
            let before = h.snapshot(&ids).await;
            match h.commit(&trx, &touched, rev).await {
                Err(RepoError::BadRequest(message)) if message.contains("revision gap") => {}
                other => panic!(
                    "commit of {trx} at {rev} on {touched:?} (at {revs:?}) must be a revision gap, got {}",
                    describe(&other)
                ),
            }
            assert_eq!(h.snapshot(&ids).await, before, "a refused commit of {trx} changes nothing");
            h.cancel(&trx, &touched).await;
            h.check_invariants(&ids, &format!("after gap {trx}")).await;
            gaps += 1;
            continue;
        }
        h.commit_ok(&trx, &touched, rev).await;
        commits += 1;
        h.check_invariants(&ids, &format!("after commit {trx}")).await;
        // A re-commit and a stale commit change nothing.
        h.commit_ok(&trx, &touched, rev).await;
        if h.commit(&trx, &touched, rev.saturating_sub(1)).await.is_ok_and(|r| r.is_success()) {
            panic!("commit of {trx} at an older revision must not succeed");
        }
        h.check_invariants(&ids, &format!("after re-commit {trx}")).await;
    }
    assert!(commits >= 6 && gaps >= 1, "the sequence commits and meets a gap: {commits} commits, {gaps} gaps");
}

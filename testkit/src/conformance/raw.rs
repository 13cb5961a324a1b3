//! Rules of the raw [`RawStorage`] contract, checked directly on the engine.

use serde_json::{Value, json};

use super::Fixture;
use super::support::{Harness, Tx, bid, block, set, splice, tid};
use optimystic_core::error::StorageError;
use optimystic_core::model::{Block, BlockId, Transform, TrxId, TrxRev};
use optimystic_core::storage::{BlockCommit, CommittedTransform, MetaWrite, RawStorage, StorageWrite};

fn insert_of(block: &Block) -> Transform {
    Transform { insert: Some(block.clone()), ..Transform::default() }
}

fn update_of(op: optimystic_core::model::BlockOperation) -> Transform {
    Transform { updates: Some(vec![op]), ..Transform::default() }
}

fn commit_of(trx: &str, rev: u64, transform: Transform, value: Option<Block>, prune: Option<u64>) -> BlockCommit {
    BlockCommit { trx_id: tid(trx), rev, transform, value, prune_value_at: prune }
}

/// Everything the engine reports about one block, to compare before and after a refused call.
async fn raw_state(raw: &dyn RawStorage, id: &BlockId, trxs: &[&str], revs: &[u64]) -> String {
    let mut out = format!("latest={:?}\n", raw.latest(id).await.expect("latest"));
    out += &format!("revisions={:?}\n", raw.revisions(id, 0, u64::MAX).await.expect("revisions"));
    out += &format!("pending_ids={:?}\n", raw.pending_trx_ids(id).await.expect("pending_trx_ids"));
    for trx in trxs {
        out += &format!("pending {trx}={:?}\n", raw.pending(id, &tid(trx)).await.expect("pending"));
        out += &format!("committed {trx}={:?}\n", raw.committed(id, &tid(trx)).await.expect("committed"));
    }
    for rev in revs {
        out += &format!("materialized {rev}={:?}\n", raw.materialized(id, *rev).await.expect("materialized"));
    }
    out += &format!("block_ids={:?}\n", raw.block_ids(None, usize::MAX).await.expect("block_ids"));
    out
}

/// `commit_block` refuses a revision that does not advance `latest` with
/// [`StorageError::Invalid`], changing nothing (the refused trx stays pending).
pub async fn raw_commit_block_refuses_non_advancing_rev(fixture: Fixture) {
    let raw = fixture.storage.as_ref();
    let a = bid("a");
    let v5 = block("a", json!({"n": 5}));
    raw.commit_block(&a, &commit_of("t5", 5, insert_of(&v5), Some(v5.clone()), None)).await.expect("first commit");
    let t2 = Transform { updates: Some(vec![set("n", json!(2))]), ..Transform::default() };
    raw.save_pending(&a, &tid("t2"), &t2).await.expect("save_pending");
    let before = raw_state(raw, &a, &["t5", "t2"], &[3, 4, 5]).await;
    for rev in [5, 4, 0] {
        let v = block("a", json!({"n": rev}));
        match raw.commit_block(&a, &commit_of("t2", rev, t2.clone(), Some(v), Some(5))).await {
            Err(StorageError::Invalid(_)) => {}
            other => panic!("commit_block at rev {rev} <= latest 5 must fail with Invalid, got {other:?}"),
        }
        assert_eq!(
            raw_state(raw, &a, &["t5", "t2"], &[3, 4, 5]).await,
            before,
            "a refused commit_block changes nothing"
        );
    }
    // The same trx at the same revision again is refused too: the engine never rewrites history.
    match raw.commit_block(&a, &commit_of("t5", 5, insert_of(&v5), Some(v5.clone()), None)).await {
        Err(StorageError::Invalid(_)) => {}
        other => panic!("commit_block repeating latest must fail with Invalid, got {other:?}"),
    }
    assert_eq!(raw_state(raw, &a, &["t5", "t2"], &[3, 4, 5]).await, before);
}

/// `commit_block` stores the value at `rev`, records `rev -> trxId`, moves the trx's transform
/// from pending to committed, sets `latest`, leaves other pending trxs alone, and may drop the
/// value at `prune_value_at`; a deleted value reads back as `Some(None)`.
pub async fn raw_commit_block_moves_pending_to_committed(fixture: Fixture) {
    let raw = fixture.storage.as_ref();
    let a = bid("a");
    let v1 = block("a", json!({"n": 1, "deep": {"x": [1, {"y": null}]}}));
    let t1 = insert_of(&v1);
    let t9 = Transform { updates: Some(vec![set("n", json!(9))]), ..Transform::default() };
    raw.save_pending(&a, &tid("t1"), &t1).await.expect("save_pending t1");
    raw.save_pending(&a, &tid("t9"), &t9).await.expect("save_pending t9");
    raw.commit_block(&a, &commit_of("t1", 1, t1.clone(), Some(v1.clone()), None)).await.expect("commit t1");

    assert_eq!(raw.latest(&a).await.expect("latest"), Some(TrxRev { trx_id: tid("t1"), rev: 1 }));
    assert_eq!(raw.pending(&a, &tid("t1")).await.expect("pending"), None, "t1 left pending");
    assert_eq!(raw.pending_trx_ids(&a).await.expect("ids"), vec![tid("t9")], "other pendings stay");
    assert_eq!(raw.pending(&a, &tid("t9")).await.expect("pending"), Some(t9));
    assert_eq!(
        raw.committed(&a, &tid("t1")).await.expect("committed"),
        Some(CommittedTransform { rev: 1, transform: t1 })
    );
    assert_eq!(raw.revisions(&a, 0, 10).await.expect("revisions"), vec![TrxRev { trx_id: tid("t1"), rev: 1 }]);
    assert_eq!(raw.materialized(&a, 1).await.expect("materialized"), Some(Some(v1.clone())));
    assert_eq!(raw.materialized(&a, 0).await.expect("materialized"), None, "no value kept at rev 0");

    let del = Transform { delete: Some(true), ..Transform::default() };
    raw.commit_block(&a, &commit_of("t2", 2, del.clone(), None, Some(1))).await.expect("commit t2");
    assert_eq!(raw.materialized(&a, 2).await.expect("materialized"), Some(None), "deleted at rev 2 is Some(None)");
    let pruned = raw.materialized(&a, 1).await.expect("materialized");
    assert!(pruned.is_none() || pruned == Some(Some(v1)), "rev 1 is dropped or intact, got {pruned:?}");
    assert_eq!(raw.latest(&a).await.expect("latest"), Some(TrxRev { trx_id: tid("t2"), rev: 2 }));
    assert_eq!(
        raw.committed(&a, &tid("t2")).await.expect("committed"),
        Some(CommittedTransform { rev: 2, transform: del })
    );
    // A commit_block without a pending record works too (the engine does not interpret).
    let v7 = block("a", json!({"again": true}));
    raw.commit_block(&a, &commit_of("t7", 7, insert_of(&v7), Some(v7.clone()), None)).await.expect("commit t7");
    assert_eq!(raw.materialized(&a, 7).await.expect("materialized"), Some(Some(v7)));
    assert_eq!(raw.materialized(&a, 2).await.expect("materialized"), Some(None), "rev 2 was not pruned");
}

/// `delete_pending` is idempotent and never fails for what is not there; a block left with no
/// commit and no pending is not listed.
pub async fn raw_delete_pending_is_idempotent(fixture: Fixture) {
    let raw = fixture.storage.as_ref();
    let a = bid("a");
    raw.delete_pending(&bid("never"), &tid("never")).await.expect("delete of nothing");
    let t = Transform { insert: Some(block("a", json!({}))), ..Transform::default() };
    raw.save_pending(&a, &tid("t1"), &t).await.expect("save_pending");
    assert_eq!(raw.block_ids(None, 10).await.expect("block_ids"), vec![a.clone()], "a block with a pending is listed");
    raw.delete_pending(&a, &tid("other")).await.expect("delete of another trx");
    assert_eq!(raw.pending(&a, &tid("t1")).await.expect("pending"), Some(t));
    for _ in 0..2 {
        raw.delete_pending(&a, &tid("t1")).await.expect("delete_pending");
        assert_eq!(raw.pending(&a, &tid("t1")).await.expect("pending"), None);
        assert!(raw.pending_trx_ids(&a).await.expect("ids").is_empty());
    }
    assert!(
        raw.block_ids(None, 10).await.expect("block_ids").is_empty(),
        "a block with no commit and no pending is not listed"
    );
    assert_eq!(raw.latest(&a).await.expect("latest"), None);
}

/// `save_pending` stores or replaces a transform; `pending_trx_ids` is sorted; transforms read back
/// equal; unknown blocks read as empty.
pub async fn raw_pending_round_trip(fixture: Fixture) {
    let raw = fixture.storage.as_ref();
    let a = bid("a");
    assert_eq!(raw.pending(&a, &tid("x")).await.expect("pending"), None);
    assert!(raw.pending_trx_ids(&a).await.expect("ids").is_empty());
    let trxs = ["b", "a", "c", "B", "a0", "é", "10", "9"];
    for (i, trx) in trxs.iter().enumerate() {
        let t = Transform {
            updates: Some(vec![set("n", json!(i)), splice("l", i as u64, 1, json!([trx, i, null]))]),
            ..Transform::default()
        };
        raw.save_pending(&a, &tid(trx), &t).await.expect("save_pending");
    }
    let mut expected: Vec<TrxId> = trxs.iter().map(|t| tid(t)).collect();
    expected.sort();
    assert_eq!(raw.pending_trx_ids(&a).await.expect("ids"), expected, "sorted by id (byte order)");
    let replaced = Transform { delete: Some(true), ..Transform::default() };
    raw.save_pending(&a, &tid("b"), &replaced).await.expect("replace");
    raw.save_pending(&a, &tid("b"), &replaced).await.expect("replace again (idempotent)");
    assert_eq!(raw.pending(&a, &tid("b")).await.expect("pending"), Some(replaced));
    assert_eq!(raw.pending_trx_ids(&a).await.expect("ids").len(), trxs.len(), "a replace adds no id");
    let t = raw.pending(&a, &tid("é")).await.expect("pending").expect("é pending");
    assert_eq!(t.updates.as_ref().map(Vec::len), Some(2));
}

/// `revisions` returns the log entries in an inclusive range, ascending by numeric rev (not by
/// text); `revision_at_or_before` finds the newest at or before a rev; large revs work.
pub async fn raw_revision_ranges(fixture: Fixture) {
    let raw = fixture.storage.as_ref();
    let a = bid("a");
    assert!(raw.revisions(&a, 0, u64::MAX).await.expect("revisions").is_empty());
    assert_eq!(raw.revision_at_or_before(&a, u64::MAX).await.expect("at_or_before"), None);
    let revs = [1u64, 3, 9, 10, 100, 1 << 40, u64::MAX - 1, u64::MAX];
    for rev in revs {
        let v = block("a", json!({"rev": rev}));
        raw.commit_block(&a, &commit_of(&format!("t{rev}"), rev, insert_of(&v), Some(v.clone()), None))
            .await
            .expect("commit_block");
    }
    let entry = |rev: u64| TrxRev { trx_id: tid(&format!("t{rev}")), rev };
    let all: Vec<TrxRev> = revs.iter().map(|r| entry(*r)).collect();
    assert_eq!(raw.revisions(&a, 0, u64::MAX).await.expect("revisions"), all, "ascending numerically");
    assert_eq!(raw.revisions(&a, 2, 10).await.expect("revisions"), vec![entry(3), entry(9), entry(10)]);
    assert_eq!(raw.revisions(&a, 3, 3).await.expect("revisions"), vec![entry(3)], "inclusive");
    assert_eq!(raw.revisions(&a, 4, 8).await.expect("revisions"), vec![], "a range with no entry");
    assert_eq!(raw.revisions(&a, 10, 9).await.expect("revisions"), vec![], "an inverted range");
    assert_eq!(raw.revisions(&a, u64::MAX, u64::MAX).await.expect("revisions"), vec![entry(u64::MAX)]);
    assert_eq!(raw.revisions(&bid("b"), 0, u64::MAX).await.expect("revisions"), vec![], "unknown block");
    let a_ref = &a;
    let at = |rev: u64| async move { raw.revision_at_or_before(a_ref, rev).await.expect("at_or_before") };
    assert_eq!(at(0).await, None);
    assert_eq!(at(1).await, Some(entry(1)));
    assert_eq!(at(2).await, Some(entry(1)));
    assert_eq!(at(9).await, Some(entry(9)));
    assert_eq!(at(11).await, Some(entry(10)));
    assert_eq!(at(99).await, Some(entry(10)));
    assert_eq!(at(u64::MAX - 2).await, Some(entry(1 << 40)));
    assert_eq!(at(u64::MAX).await, Some(entry(u64::MAX)));
    assert_eq!(raw.latest(&a).await.expect("latest"), Some(entry(u64::MAX)));
    assert_eq!(
        raw.materialized(&a, u64::MAX - 1).await.expect("materialized"),
        Some(Some(block("a", json!({"rev": u64::MAX - 1}))))
    );
}

/// Metadata: put / get / replace / delete (idempotent), `list_meta` by prefix, sorted, limited;
/// binary and empty values; keys with any characters.
pub async fn raw_meta_put_get_delete_list(fixture: Fixture) {
    let raw = fixture.storage.as_ref();
    assert_eq!(raw.get_meta("none").await.expect("get"), None);
    raw.delete_meta("none").await.expect("delete of nothing");
    assert!(raw.list_meta("", 10).await.expect("list").is_empty());

    let binary: Vec<u8> = (0..=255u8).collect();
    let entries: Vec<(&str, Vec<u8>)> = vec![
        ("p/2", b"two".to_vec()),
        ("p/1", binary.clone()),
        ("p/10", Vec::new()),
        ("p0", b"p0".to_vec()),
        ("p", b"p".to_vec()),
        ("q/1", b"q".to_vec()),
        ("../escape", b"e".to_vec()),
        ("p/é\u{0}/x", b"odd".to_vec()),
    ];
    for (k, v) in &entries {
        raw.put_meta(k, v).await.expect("put");
    }
    for (k, v) in &entries {
        assert_eq!(raw.get_meta(k).await.expect("get").as_deref(), Some(v.as_slice()), "value of {k:?}");
    }
    raw.put_meta("p/2", b"TWO").await.expect("replace");
    raw.put_meta("p/2", b"TWO").await.expect("replace again");
    assert_eq!(raw.get_meta("p/2").await.expect("get"), Some(b"TWO".to_vec()));

    let keys = |list: Vec<(String, Vec<u8>)>| list.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(keys(raw.list_meta("p/", 100).await.expect("list")), ["p/1", "p/10", "p/2", "p/é\u{0}/x"]);
    assert_eq!(keys(raw.list_meta("p/", 2).await.expect("list")), ["p/1", "p/10"], "limit");
    assert!(raw.list_meta("p/", 0).await.expect("list").is_empty(), "limit 0");
    assert_eq!(keys(raw.list_meta("p", 100).await.expect("list")), ["p", "p/1", "p/10", "p/2", "p/é\u{0}/x", "p0"]);
    assert_eq!(keys(raw.list_meta("", 100).await.expect("list")).len(), entries.len());
    assert!(raw.list_meta("r", 100).await.expect("list").is_empty());
    let listed = raw.list_meta("p/1", 100).await.expect("list");
    assert_eq!(listed, vec![("p/1".to_owned(), binary), ("p/10".to_owned(), Vec::new())], "values listed");

    for _ in 0..2 {
        raw.delete_meta("p/1").await.expect("delete");
        assert_eq!(raw.get_meta("p/1").await.expect("get"), None);
    }
    assert_eq!(keys(raw.list_meta("p/", 100).await.expect("list")), ["p/10", "p/2", "p/é\u{0}/x"]);
    assert!(raw.block_ids(None, 100).await.expect("block_ids").is_empty(), "metadata is not blocks");
}

/// Metadata keys of any length (evidence and tombstone keys of 256-byte ids run to about 800
/// bytes) are stored, read, listed in key order under any limit, and deleted like short ones.
pub async fn raw_meta_long_keys(fixture: Fixture) {
    let raw = fixture.storage.as_ref();
    let x = |n: usize| format!("k/{}", "x".repeat(n));
    let head = x(600);
    let mut keys = vec![
        format!("{head}/b"),
        format!("{head}/a"),
        format!("{head}/a0"),
        format!("{head}/c/{}", "z".repeat(200)),
        head.clone(),
        x(300),
        "k/y".to_owned(),
    ];
    // Lengths around any engine's limit for a key kept as it is (LMDB's is 511 bytes).
    for n in 470..=520 {
        keys.push(format!("{}é", x(n)));
        keys.push(x(n));
    }
    for key in &keys {
        raw.put_meta(key, key.as_bytes()).await.expect("put of a long key");
    }
    for key in &keys {
        assert_eq!(
            raw.get_meta(key).await.expect("get").as_deref(),
            Some(key.as_bytes()),
            "value of a {}-byte key",
            key.len()
        );
    }
    keys.sort();
    let listed = |list: Vec<(String, Vec<u8>)>| {
        for (key, value) in &list {
            assert_eq!(value, key.as_bytes(), "the value listed with a {}-byte key", key.len());
        }
        list.into_iter().map(|(k, _)| k).collect::<Vec<_>>()
    };
    assert_eq!(listed(raw.list_meta("k/", usize::MAX).await.expect("list")), keys, "sorted by key");
    for limit in [1, 2, 50, keys.len() - 3, keys.len() - 1] {
        assert_eq!(listed(raw.list_meta("k/", limit).await.expect("list")), keys[..limit], "the first {limit} keys");
    }
    let under = |prefix: &str| keys.iter().filter(|k| k.starts_with(prefix)).cloned().collect::<Vec<_>>();
    for prefix in [format!("{head}/"), format!("{head}/a"), x(500), x(476)] {
        let expected = under(&prefix);
        assert!(!expected.is_empty());
        assert_eq!(
            listed(raw.list_meta(&prefix, usize::MAX).await.expect("list")),
            expected,
            "under a {}-byte prefix",
            prefix.len()
        );
        assert_eq!(
            listed(raw.list_meta(&prefix, 1).await.expect("list")),
            expected[..1],
            "limit 1 under a {}-byte prefix",
            prefix.len()
        );
    }
    let gone = format!("{head}/a");
    raw.write_meta(&[MetaWrite::Delete(gone.clone()), MetaWrite::Delete(format!("{head}/never"))])
        .await
        .expect("delete");
    assert_eq!(raw.get_meta(&gone).await.expect("get"), None);
    keys.retain(|k| *k != gone);
    assert_eq!(listed(raw.list_meta("k/", usize::MAX).await.expect("list")), keys);
}

/// A metadata batch applies its puts and deletes in order; an empty batch and deletes of absent
/// keys are fine.
pub async fn raw_meta_batch_applies_in_order(fixture: Fixture) {
    let raw = fixture.storage.as_ref();
    raw.write_meta(&[]).await.expect("empty batch");
    raw.put_meta("keep", b"k").await.expect("put");
    let put = |k: &str, v: &[u8]| MetaWrite::Put(k.to_owned(), v.to_vec());
    let delete = |k: &str| MetaWrite::Delete(k.to_owned());
    let batch =
        [put("a", b"1"), put("b", b"2"), delete("a"), delete("never"), put("c", b"3"), put("b", b"22"), put("a", b"")];
    for _ in 0..2 {
        raw.write_meta(&batch).await.expect("batch");
        assert_eq!(raw.get_meta("a").await.expect("get"), Some(Vec::new()), "the last write of a key wins");
        assert_eq!(raw.get_meta("b").await.expect("get"), Some(b"22".to_vec()));
        assert_eq!(raw.get_meta("c").await.expect("get"), Some(b"3".to_vec()));
        assert_eq!(
            raw.get_meta("keep").await.expect("get"),
            Some(b"k".to_vec()),
            "keys outside the batch are untouched"
        );
    }
    raw.write_meta(&[delete("a"), delete("b"), delete("c")]).await.expect("deletes");
    let left: Vec<String> = raw.list_meta("", 10).await.expect("list").into_iter().map(|(k, _)| k).collect();
    assert_eq!(left, ["keep"]);
}

/// `apply` makes every write of a step visible, each seeing the writes before it: a pending
/// saved and a commit of it in one step, a second revision on top of the first, a pending saved
/// and deleted again (the block is then not listed), metadata in order.
pub async fn raw_apply_writes_a_step_in_order(fixture: Fixture) {
    let raw = fixture.storage.as_ref();
    raw.apply(&[]).await.expect("an empty step");
    let (a, b, c) = (bid("a"), bid("b"), bid("c"));
    let a1 = block("a", json!({"n": 1}));
    let a2 = block("a", json!({"n": 2}));
    let b1 = block("b", json!({"n": 1}));
    let step = [
        StorageWrite::SavePending { block_id: a.clone(), trx_id: tid("t1"), transform: insert_of(&a1) },
        StorageWrite::Commit {
            block_id: a.clone(),
            commit: Box::new(commit_of("t1", 1, insert_of(&a1), Some(a1.clone()), None)),
        },
        StorageWrite::Commit {
            block_id: a.clone(),
            commit: Box::new(commit_of("t2", 2, update_of(set("n", json!(2))), Some(a2.clone()), Some(1))),
        },
        StorageWrite::SavePending { block_id: b.clone(), trx_id: tid("t3"), transform: insert_of(&b1) },
        StorageWrite::SavePending { block_id: c.clone(), trx_id: tid("t4"), transform: insert_of(&b1) },
        StorageWrite::DeletePending { block_id: c.clone(), trx_id: tid("t4") },
        StorageWrite::Meta(MetaWrite::Put("k".into(), b"1".to_vec())),
        StorageWrite::Meta(MetaWrite::Put("k".into(), b"2".to_vec())),
        StorageWrite::Meta(MetaWrite::Delete("never".into())),
    ];
    raw.apply(&step).await.expect("the step");
    assert_eq!(raw.latest(&a).await.expect("latest"), Some(TrxRev { trx_id: tid("t2"), rev: 2 }));
    assert_eq!(
        raw.revisions(&a, 0, u64::MAX).await.expect("revisions"),
        [TrxRev { trx_id: tid("t1"), rev: 1 }, TrxRev { trx_id: tid("t2"), rev: 2 }]
    );
    assert_eq!(raw.pending(&a, &tid("t1")).await.expect("pending"), None, "the commit moved t1 out of pending");
    assert_eq!(raw.materialized(&a, 2).await.expect("materialized"), Some(Some(a2)));
    assert_eq!(raw.pending(&b, &tid("t3")).await.expect("pending"), Some(insert_of(&b1)));
    assert_eq!(raw.pending_trx_ids(&c).await.expect("pending ids"), Vec::<TrxId>::new());
    assert_eq!(raw.block_ids(None, usize::MAX).await.expect("block_ids"), [a.clone(), b.clone()], "c was forgotten");
    if let Some(stats) = raw.stats().await.expect("stats") {
        assert_eq!(stats.blocks, 2, "the count follows the step's own writes: {stats:?}");
    }
    assert_eq!(raw.get_meta("k").await.expect("get_meta"), Some(b"2".to_vec()), "the last write of a key wins");
}

/// A step with a refused write fails with [`StorageError::Invalid`]; on an engine with atomic
/// steps ([`RawStorage::atomic_apply`]) it changes nothing, not even the writes before the
/// refused one.
pub async fn raw_apply_refused_step(fixture: Fixture) {
    let raw = fixture.storage.as_ref();
    let a = bid("a");
    let a1 = block("a", json!({"n": 1}));
    raw.save_pending(&a, &tid("t1"), &insert_of(&a1)).await.expect("save_pending");
    raw.commit_block(&a, &commit_of("t1", 1, insert_of(&a1), Some(a1.clone()), None)).await.expect("commit");
    let before = raw_state(raw, &a, &["t1", "t2", "t3"], &[1]).await;
    let step = [
        StorageWrite::Meta(MetaWrite::Put("k".into(), b"1".to_vec())),
        StorageWrite::SavePending { block_id: a.clone(), trx_id: tid("t2"), transform: update_of(set("n", json!(2))) },
        StorageWrite::SavePending { block_id: bid("new"), trx_id: tid("t2"), transform: update_of(set("n", json!(2))) },
        // Does not advance latest rev 1.
        StorageWrite::Commit {
            block_id: a.clone(),
            commit: Box::new(commit_of("t3", 1, update_of(set("n", json!(3))), None, None)),
        },
    ];
    let refused = raw.apply(&step).await.expect_err("a step with a non-advancing commit");
    assert!(matches!(refused, StorageError::Invalid(_)), "{refused:?}");
    if raw.atomic_apply() {
        assert_eq!(raw_state(raw, &a, &["t1", "t2", "t3"], &[1]).await, before, "an atomic step changes nothing");
        assert_eq!(raw.get_meta("k").await.expect("get_meta"), None);
        assert_eq!(raw.block_ids(None, usize::MAX).await.expect("block_ids"), vec![a]);
        if let Some(stats) = raw.stats().await.expect("stats") {
            assert_eq!(stats.blocks, 1, "{stats:?}");
        }
    }
}

/// `block_ids` lists every block with a commit or a pending, sorted, paged with `after` and
/// `limit`.
pub async fn raw_block_ids_pagination(fixture: Fixture) {
    let h = Harness::new(fixture);
    let raw = h.raw();
    let mut expected = Vec::new();
    for i in 0..23 {
        let id = format!("b{i:02}");
        if i % 3 == 0 {
            // Pending only (an insert not yet committed).
            h.pend_ok(
                &format!("p{i}"),
                None,
                Tx::new().insert(&id, json!({})).build(),
                optimystic_core::model::PendPolicy::Continue,
            )
            .await;
        } else {
            h.apply(&format!("c{i}"), 1, Tx::new().insert(&id, json!({})).build()).await;
        }
        expected.push(bid(&id));
    }
    // A block whose only pending was cancelled is not listed.
    h.pend_ok("gone", None, Tx::new().insert("b99", json!({})).build(), optimystic_core::model::PendPolicy::Continue)
        .await;
    h.cancel("gone", &["b99"]).await;
    expected.sort();

    assert_eq!(raw.block_ids(None, usize::MAX).await.expect("block_ids"), expected);
    for page_size in [1usize, 5, 7, 23, 100] {
        let mut all = Vec::new();
        let mut after: Option<BlockId> = None;
        for _ in 0..=expected.len() + 1 {
            let page = raw.block_ids(after.as_ref(), page_size).await.expect("block_ids page");
            assert!(page.len() <= page_size, "a page holds at most `limit` ids");
            if let (Some(after), Some(first)) = (&after, page.first()) {
                assert!(first > after, "a page starts after `after` ({after:?}), got {first:?}");
            }
            let Some(last) = page.last().cloned() else { break };
            all.extend(page);
            after = Some(last);
        }
        assert_eq!(all, expected, "pages of {page_size} cover every id once, in order");
    }
    assert!(raw.block_ids(None, 0).await.expect("block_ids").is_empty(), "limit 0");
    assert_eq!(raw.block_ids(Some(&bid("b055")), 2).await.expect("block_ids"), vec![bid("b06"), bid("b07")]);
    assert!(raw.block_ids(Some(&bid("b22")), 10).await.expect("block_ids").is_empty());
    assert!(raw.block_ids(Some(&bid("zzz")), 10).await.expect("block_ids").is_empty());
}

/// Ids are opaque: block and trx ids with path separators, dots, NUL, reserved file names, case
/// variants, non-ASCII and the maximum length are kept apart and read back exactly.
pub async fn raw_ids_are_opaque(fixture: Fixture) {
    let h = Harness::new(fixture);
    let long_block = "é".repeat(128); // 256 bytes
    let long_trx = "x".repeat(128);
    let ids: Vec<String> = [
        "a",
        "A",
        "../a",
        "a/b",
        "a\\b",
        ".",
        "..",
        "CON",
        "nul",
        "x:y*?<>|\"",
        "\u{0}",
        " ",
        "a ",
        "%2e%2e",
        "漢字🙂",
        "a.json",
        "a.tmp",
        "-",
        "~a",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([long_block.clone()])
    .collect();
    let short = |id: &str| id.chars().take(8).collect::<String>();
    let trx_of = |i: usize, id: &str| if i == 0 { long_trx.clone() } else { format!("{}/trx\u{0}{i}", short(id)) };
    // Blocks end at different revisions (1 to 4; revisions are contiguous, SPEC 2 item 7), so that
    // an engine mixing up two ids shows a wrong `latest`.
    let last_rev = |i: usize| 1 + (i % 4) as u64;
    for (i, id) in ids.iter().enumerate() {
        for rev in 1..last_rev(i) {
            let fields = json!({"i": i, "id": id, "rev": rev});
            h.apply(&format!("{}/pre\u{0}{i}-{rev}", short(id)), rev, Tx::new().insert(id, fields).build()).await;
        }
        let rev = last_rev(i);
        h.apply(&trx_of(i, id), rev, Tx::new().insert(id, json!({"i": i, "id": id})).build()).await;
        h.pend_ok(
            &format!("p-{}-{i}", short(id)),
            None,
            Tx::new().update(id, vec![set("i", json!(-1))]).build(),
            optimystic_core::model::PendPolicy::Continue,
        )
        .await;
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(h.value(id, None).await, Some(block(id, json!({"i": i, "id": id}))), "value of {id:?}");
        assert_eq!(
            h.latest(id).await,
            Some(TrxRev { trx_id: tid(&trx_of(i, id)), rev: last_rev(i) }),
            "latest of {id:?}"
        );
        assert_eq!(h.pendings(id).await, vec![tid(&format!("p-{}-{i}", short(id)))], "pendings of {id:?}");
    }
    let mut expected: Vec<BlockId> = ids.iter().map(|id| bid(id)).collect();
    expected.sort();
    assert_eq!(h.raw().block_ids(None, usize::MAX).await.expect("block_ids"), expected, "every id listed once");
    h.check_invariants(&ids.iter().map(String::as_str).collect::<Vec<_>>(), "opaque ids").await;
}

/// Block values and transforms round-trip untouched: nested JSON, unicode, large and negative
/// integers, floats, empty strings and containers, the order of fields, unknown header fields.
pub async fn raw_values_round_trip(fixture: Fixture) {
    let h = Harness::new(fixture);
    let raw = h.raw();
    let fields = json!({
        "zeta": 1,
        "alpha": [u64::MAX, i64::MIN, -1, 0, 1.5, -0.25, 0.1, 1e21],
        "empty": {"s": "", "a": [], "o": {}},
        "text": "quote \" backslash \\ newline \n tab \t nul \u{0} é 漢字 🙂 \u{7f}",
        "nested": {"b": {"c": {"d": [null, true, false, {"e": []}]}}},
        "10": "numeric-looking key",
        "": "empty key"
    });
    let mut value = block("v", fields);
    value.header.extra.insert("zExtra".into(), json!({"kept": [1, "two"]}));
    value.header.extra.insert("aExtra".into(), Value::Null);
    let transforms = Tx::new().insert_block("v", value.clone()).build();
    h.pend_ok("t1", None, transforms.clone(), optimystic_core::model::PendPolicy::Continue).await;
    let v = bid("v");
    let pending = raw.pending(&v, &tid("t1")).await.expect("pending").expect("t1 pending");
    let inserted = pending.insert.as_ref().expect("insert kept");
    assert_eq!(inserted, &value, "the pending insert reads back equal");
    assert_eq!(
        serde_json::to_string(inserted).expect("json"),
        serde_json::to_string(&value).expect("json"),
        "the pending insert keeps field order"
    );
    h.commit_ok("t1", &["v"], 1).await;
    let stored = raw.materialized(&v, 1).await.expect("materialized").flatten().expect("value at 1");
    assert_eq!(stored, value);
    assert_eq!(serde_json::to_string(&stored).expect("json"), serde_json::to_string(&value).expect("json"));
    let committed = raw.committed(&v, &tid("t1")).await.expect("committed").expect("t1 committed");
    assert_eq!(committed.transform, transforms.transform_for(&v));
    assert_eq!(h.value("v", None).await, Some(value.clone()));

    // An update keeps the untouched fields as they were.
    h.apply("t2", 2, Tx::new().update("v", vec![set("zeta", json!(2)), splice("alpha", 0, 1, json!([]))]).build())
        .await;
    let updated = h.value("v", None).await.expect("value at 2");
    let mut expected = value;
    expected.fields.insert("zeta".into(), json!(2));
    if let Some(Value::Array(alpha)) = expected.fields.get_mut("alpha") {
        alpha.remove(0);
    }
    assert_eq!(serde_json::to_string(&updated).expect("json"), serde_json::to_string(&expected).expect("json"));
}

/// `stats`, when the engine reports it, counts exactly the blocks `block_ids` lists (blocks with
/// a commit or a pending, not those whose only pending was cancelled).
pub async fn raw_stats_count_blocks(fixture: Fixture) {
    async fn count(h: &Harness) -> (u64, Option<optimystic_core::storage::StorageStats>) {
        let listed = h.raw().block_ids(None, usize::MAX).await.expect("block_ids").len() as u64;
        (listed, h.raw().stats().await.expect("stats"))
    }
    let h = Harness::new(fixture);
    let (listed, stats) = count(&h).await;
    assert_eq!(listed, 0);
    if let Some(stats) = stats {
        assert_eq!(stats.blocks, 0, "an empty store has no blocks");
    }
    h.apply("t1", 1, Tx::new().insert("a", json!({})).insert("b", json!({})).build()).await;
    h.pend_ok("t2", None, Tx::new().insert("c", json!({})).build(), optimystic_core::model::PendPolicy::Continue).await;
    h.pend_ok("t3", None, Tx::new().insert("d", json!({})).build(), optimystic_core::model::PendPolicy::Continue).await;
    h.cancel("t3", &["d"]).await;
    h.raw().put_meta("not-a-block", b"x").await.expect("put_meta");
    let (listed, stats) = count(&h).await;
    assert_eq!(listed, 3);
    if let Some(stats) = stats {
        assert_eq!(stats.blocks, listed, "stats.blocks counts the listed blocks: {stats:?}");
    }
}

/// `close` is idempotent.
pub async fn raw_close_is_idempotent(fixture: Fixture) {
    let raw = fixture.storage.as_ref();
    raw.put_meta("k", b"v").await.expect("put");
    raw.close().await.expect("close");
    raw.close().await.expect("close again");
}

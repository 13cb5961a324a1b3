//! Group commit: concurrent write batches of a [`KvBlockStorage`](super::KvBlockStorage) applied
//! as one [`KvStore::write`] (one transaction and one sync on a durable store).
//!
//! Used when the store's writes wait for the disk ([`KvStore::WRITES_WAIT`]) and a tokio runtime
//! is running. A caller queues its batch and waits for its answer; the first caller that finds no
//! writer running starts one on tokio's blocking pool. The writer takes the queued batches in
//! order (at most [`GROUP_MAX_BATCHES`] batches and about [`GROUP_MAX_BYTES`] bytes at a time),
//! writes them as one durable batch, and only then answers each caller: an answer `Ok` means the
//! batch is on stable storage, as for a lone write. A batch that arrives while a group is being
//! written goes into the next group, so under load each sync covers every batch that arrived
//! during the previous one, and an idle store writes a lone batch at once (no timer).
//!
//! Block mutations check what they change (`latest`, the block index and count) before they
//! write. They compute their batch under the storage's writer lock against the store as it will
//! be once everything queued before them is written (an overlay of the queued writes), then queue
//! it and release the lock, so mutations of different blocks share a sync. A mutation that
//! writes nothing, or is refused, after a check that saw queued writes queues an empty batch (a
//! barrier) and answers once the writes before it are written: an answer never rests on writes
//! that are not durable yet, or that then fail (the caller gets that failure instead).
//!
//! Errors: a failed group write applied nothing of the group (the store's batch is atomic). Every
//! batch of the group fails with that error, and so does every batch queued behind it, since
//! mutations among them were computed on top of the failed writes; the overlay is emptied under
//! the writer lock, so nothing computed on it survives. Keys are checked by the store before it
//! writes anything, so a bad key fails its group too: [`KvBlockStorage`](super::KvBlockStorage)
//! never builds one.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::{KvEntry, KvStore, KvWrite};
use crate::error::StorageError;

/// Batches that may wait for the group writer at once; a caller past this waits for a slot
/// before it queues (and, for a mutation, before it computes its batch).
pub const GROUP_QUEUE_BATCHES: usize = 1_024;
/// The most batches written in one group (one store transaction).
pub const GROUP_MAX_BATCHES: usize = 256;
/// A group stops taking batches once their keys and values reach this many bytes (4 MiB); a
/// single larger batch is written alone.
pub const GROUP_MAX_BYTES: usize = 4 << 20;

/// Counters of a storage's group commit since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Batches written (each caller's batch counts once).
    pub batches: u64,
    /// Store writes that carried them: one transaction and one sync each on a durable store.
    pub writes: u64,
    /// Batches queued now, not yet taken by the writer.
    pub queued: usize,
}

/// One queued batch and who waits for it.
struct Queued {
    seq: u64,
    batch: Vec<KvWrite>,
    bytes: usize,
    reply: oneshot::Sender<Result<(), StorageError>>,
    _slot: OwnedSemaphorePermit,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    /// A writer task is running (it empties the queue before it stops).
    writing: bool,
    /// Queued or being written: the newest write of each key, with the sequence number of its
    /// batch (`None`: a delete).
    overlay: BTreeMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
    next_seq: u64,
    batches: u64,
    writes: u64,
}

/// The group commit queue of one storage.
pub(crate) struct GroupCommit {
    slots: Arc<Semaphore>,
    state: Mutex<State>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

/// A queue slot held from before a batch is built until it is answered.
pub(crate) struct Slot(OwnedSemaphorePermit);

/// What a caller waits on after queueing; `start` asks it to start the writer.
pub(crate) struct Pending {
    pub(crate) answer: oneshot::Receiver<Result<(), StorageError>>,
    pub(crate) start: bool,
}

fn batch_bytes(batch: &[KvWrite]) -> usize {
    batch
        .iter()
        .map(|w| match w {
            KvWrite::Put { key, value } => key.len().saturating_add(value.len()),
            KvWrite::Delete { key } => key.len(),
        })
        .fold(0, usize::saturating_add)
}

/// A copy of `e` for each caller of a failed group (a `StorageError` is not `Clone`).
fn copy_error(engine: &'static str, e: &StorageError) -> StorageError {
    match e {
        StorageError::Io { context, error } => {
            StorageError::Io { context: context.clone(), error: std::io::Error::new(error.kind(), error.to_string()) }
        }
        StorageError::Corrupt(m) => StorageError::Corrupt(m.clone()),
        StorageError::Full(m) => StorageError::Full(m.clone()),
        StorageError::Locked(m) => StorageError::Locked(m.clone()),
        StorageError::Incompatible(m) => StorageError::Incompatible(m.clone()),
        StorageError::Invalid(m) => StorageError::Invalid(m.clone()),
        StorageError::Closed { engine } => StorageError::Closed { engine },
        other => StorageError::Failed { engine, message: other.to_string() },
    }
}

impl GroupCommit {
    pub(crate) fn new() -> Self {
        Self { slots: Arc::new(Semaphore::new(GROUP_QUEUE_BATCHES)), state: Mutex::new(State::default()) }
    }

    // The state is consistent between statements (no user code runs under the lock): a poisoned
    // lock is used as it is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn stats(&self) -> GroupStats {
        let state = self.state();
        GroupStats { batches: state.batches, writes: state.writes, queued: state.queue.len() }
    }

    /// Waits for a queue slot.
    pub(crate) async fn slot(&self) -> Result<Slot, StorageError> {
        Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map(Slot)
            .map_err(|_| StorageError::Failed { engine: "group commit", message: "the write queue is closed".into() })
    }

    /// Whether writes are queued or being written.
    pub(crate) fn has_queued(&self) -> bool {
        !self.state().overlay.is_empty()
    }

    /// Queues `batch`; an empty one is a barrier, answered after the writes queued before it. A
    /// mutation calls this under the storage's writer lock.
    pub(crate) fn enqueue(&self, batch: Vec<KvWrite>, slot: Slot) -> Pending {
        let (reply, answer) = oneshot::channel();
        let mut state = self.state();
        let seq = state.next_seq;
        state.next_seq = seq.wrapping_add(1);
        for write in &batch {
            let value = match write {
                KvWrite::Put { value, .. } => Some(value.clone()),
                KvWrite::Delete { .. } => None,
            };
            state.overlay.insert(write.key().to_vec(), (seq, value));
        }
        let bytes = batch_bytes(&batch);
        state.queue.push_back(Queued { seq, batch, bytes, reply, _slot: slot.0 });
        let start = !state.writing;
        state.writing = true;
        Pending { answer, start }
    }

    /// The writer: writes groups until the queue is empty. `writer` is the storage's writer lock
    /// (taken on failure, see the module documentation).
    pub(crate) fn run<S: KvStore>(&self, store: &S, writer: &Mutex<()>) {
        let _stop = StopOnPanic(self);
        loop {
            let mut group = {
                let mut state = self.state();
                let mut group = Vec::new();
                let mut bytes = 0usize;
                while let Some(next) = state.queue.front() {
                    if !group.is_empty()
                        && (group.len() >= GROUP_MAX_BATCHES || bytes.saturating_add(next.bytes) > GROUP_MAX_BYTES)
                    {
                        break;
                    }
                    bytes = bytes.saturating_add(next.bytes);
                    if let Some(next) = state.queue.pop_front() {
                        group.push(next);
                    }
                }
                if group.is_empty() {
                    state.writing = false;
                    return;
                }
                group
            };
            let last_seq = group.last().map_or(0, |q| q.seq);
            let batch: Vec<KvWrite> = match group.as_mut_slice() {
                [one] => std::mem::take(&mut one.batch),
                many => many.iter_mut().flat_map(|q| std::mem::take(&mut q.batch)).collect(),
            };
            // A group of barriers only has nothing to write.
            let written = if batch.is_empty() { Ok(()) } else { store.write(&batch, true) };
            match written {
                Ok(()) => {
                    {
                        let mut state = self.state();
                        for write in &batch {
                            if state.overlay.get(write.key()).is_some_and(|(seq, _)| seq_le(*seq, last_seq)) {
                                state.overlay.remove(write.key());
                            }
                        }
                        if !batch.is_empty() {
                            state.writes = state.writes.saturating_add(1);
                        }
                        state.batches = state.batches.saturating_add(group.len() as u64);
                    }
                    for queued in group {
                        // A caller that stopped waiting is no error.
                        let _ = queued.reply.send(Ok(()));
                    }
                }
                Err(e) => {
                    let behind = {
                        let _writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
                        let mut state = self.state();
                        state.overlay.clear();
                        std::mem::take(&mut state.queue)
                    };
                    tracing::warn!(engine = store.name(), error = %e, failed = group.len() + behind.len(),
                        "a group write failed: its batches and those queued behind it are refused");
                    for queued in group.into_iter().chain(behind) {
                        let _ = queued.reply.send(Err(copy_error(store.name(), &e)));
                    }
                }
            }
        }
    }

    /// The value of `key` in the writes queued or being written: `Some(None)` for a delete, `None`
    /// when none of them writes `key`.
    pub(crate) fn overlay_get(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        self.state().overlay.get(key).map(|(_, value)| value.clone())
    }

    /// The writes queued or being written in the key range of a scan: key, and value or `None`
    /// for a delete.
    pub(crate) fn overlay_range(&self, prefix: &[u8], start: &[u8]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        self.state()
            .overlay
            .range::<[u8], _>((Bound::Included(start.max(prefix)), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, (_, value))| (key.clone(), value.clone()))
            .collect()
    }
}

/// `a` was queued no later than `b` (sequence numbers wrap).
fn seq_le(a: u64, b: u64) -> bool {
    b.wrapping_sub(a) < u64::MAX / 2
}

/// Should the writer panic (a store bug), the callers it holds and those queued get an error
/// (their answer channels close) and the next caller starts a new writer.
struct StopOnPanic<'a>(&'a GroupCommit);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.state();
            state.overlay.clear();
            state.queue.clear();
            state.writing = false;
        }
    }
}

/// A scan of `store` as it will be once the queued writes are written.
pub(crate) fn scan_through(
    group: &GroupCommit,
    store: &impl KvStore,
    prefix: &[u8],
    start: &[u8],
    limit: usize,
) -> Result<Vec<KvEntry>, StorageError> {
    scan_overlaid(group.overlay_range(prefix, start), limit, |n| store.scan(prefix, start, n))
}

/// A scan of at most `limit` entries through writes the view underneath does not hold yet:
/// `overlay` holds those writes within the scanned range (`None` deletes a key), and `scan`
/// reads the view underneath, at most as many entries as it is given.
pub(crate) fn scan_overlaid(
    overlay: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    limit: usize,
    scan: impl FnOnce(usize) -> Result<Vec<KvEntry>, StorageError>,
) -> Result<Vec<KvEntry>, StorageError> {
    if overlay.is_empty() {
        return scan(limit);
    }
    // Each overlaid write can hide at most one entry underneath.
    let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = scan(limit.saturating_add(overlay.len()))?.into_iter().collect();
    for (key, value) in overlay {
        match value {
            Some(value) => merged.insert(key, value),
            None => merged.remove(&key),
        };
    }
    Ok(merged.into_iter().take(limit).collect())
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    use super::*;
    use crate::kv::{KvBlockStorage, scan_map};
    use crate::model::{Block, BlockId, Transform, TrxId};
    use crate::storage::{BlockCommit, MetaWrite, RawStorage};

    /// A sorted map whose writes wait: the first write signals `entered` and waits for `gate`;
    /// write number `fail_at` (1-based) fails with `Full`.
    #[derive(Debug)]
    struct Gated {
        map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
        writes: AtomicUsize,
        fail_at: usize,
        entered: Mutex<Option<mpsc::Sender<()>>>,
        gate: Mutex<Option<mpsc::Receiver<()>>>,
    }

    impl KvStore for Gated {
        const READS_WAIT: bool = false;
        const WRITES_WAIT: bool = true;

        fn name(&self) -> &'static str {
            "gated"
        }
        fn durable(&self) -> bool {
            true
        }
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
            Ok(self.map.lock().map_err(|_| StorageError::Corrupt("poisoned".into()))?.get(key).cloned())
        }
        fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<KvEntry>, StorageError> {
            let map = self.map.lock().map_err(|_| StorageError::Corrupt("poisoned".into()))?;
            Ok(scan_map(&map, prefix, start, limit))
        }
        fn write(&self, batch: &[KvWrite], _durable: bool) -> Result<(), StorageError> {
            if let Some(entered) = self.entered.lock().ok().and_then(|mut e| e.take()) {
                let _ = entered.send(());
                if let Some(gate) = self.gate.lock().ok().and_then(|mut g| g.take()) {
                    let _ = gate.recv();
                }
            }
            let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
            if n == self.fail_at {
                return Err(StorageError::Full("the test store refuses this write".into()));
            }
            let mut map = self.map.lock().map_err(|_| StorageError::Corrupt("poisoned".into()))?;
            for write in batch {
                match write {
                    KvWrite::Put { key, value } => map.insert(key.clone(), value.clone()),
                    KvWrite::Delete { key } => map.remove(key),
                };
            }
            Ok(())
        }
        fn flush(&self) -> Result<(), StorageError> {
            Ok(())
        }
        fn close(&self) -> Result<(), StorageError> {
            Ok(())
        }
    }

    /// A storage over a gated store, the signal that its first write started, and its gate.
    fn gated(fail_at: usize) -> (KvBlockStorage<Gated>, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (gate_tx, gate_rx) = mpsc::channel();
        let store = Gated {
            map: Mutex::default(),
            writes: AtomicUsize::new(0),
            fail_at,
            entered: Mutex::new(Some(entered_tx)),
            gate: Mutex::new(Some(gate_rx)),
        };
        (KvBlockStorage::over(store), entered_rx, gate_tx)
    }

    fn bid(i: usize) -> BlockId {
        BlockId::new(format!("block-{i}")).expect("a valid block id")
    }

    fn tid() -> TrxId {
        TrxId::new("trx").expect("a valid trx id")
    }

    /// Starts a first write and returns once the store holds it at its gate.
    async fn hold_first_write(
        storage: &KvBlockStorage<Gated>,
        entered: mpsc::Receiver<()>,
    ) -> tokio::task::JoinHandle<Result<(), StorageError>> {
        let first = {
            let storage = storage.clone();
            tokio::spawn(async move { storage.save_pending(&bid(0), &tid(), &Transform::default()).await })
        };
        tokio::task::spawn_blocking(move || entered.recv()).await.expect("joined").expect("the first write started");
        first
    }

    /// Waits until `n` batches are queued behind the held write.
    async fn until_queued(storage: &KvBlockStorage<Gated>, n: usize) {
        while storage.group_stats().queued < n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_queued_during_a_write_share_the_next_one() {
        let (storage, entered, gate) = gated(0);
        let first = hold_first_write(&storage, entered).await;
        let mut calls = Vec::new();
        for i in 1..=20 {
            let s = storage.clone();
            calls.push(tokio::spawn(async move {
                s.write_meta(&[MetaWrite::Put(format!("k{i}"), vec![1])]).await?;
                s.save_pending(&bid(i), &tid(), &Transform::default()).await
            }));
        }
        until_queued(&storage, 20).await;
        // Nothing is answered before the write that carries it.
        assert_eq!(storage.get_meta("k1").await.expect("read"), None);
        gate.send(()).expect("the gate is open");
        first.await.expect("joined").expect("the first write");
        for call in calls {
            call.await.expect("joined").expect("a queued write");
        }
        let stats = storage.group_stats();
        assert_eq!(stats.batches, 41);
        // The first write alone, then the 20 metadata batches together, then the 20 pends
        // (queued by their callers once their metadata was written) in at most 20 more writes.
        assert!(stats.writes < 41, "{stats:?}");
        assert_eq!(storage.store().writes.load(Ordering::SeqCst) as u64, stats.writes);
        for i in 1..=20 {
            assert_eq!(storage.get_meta(&format!("k{i}")).await.expect("read"), Some(vec![1]));
            assert!(storage.pending(&bid(i), &tid()).await.expect("read").is_some());
        }
        // The block count was checked through the queued writes: every new block counted once.
        assert_eq!(storage.stats().await.expect("stats").map(|s| s.blocks), Some(21));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mutations_queued_together_count_blocks_once_each() {
        let (storage, entered, gate) = gated(0);
        let first = hold_first_write(&storage, entered).await;
        let mut calls = Vec::new();
        for i in 1..=30 {
            let s = storage.clone();
            // Blocks 1..=15 twice (two trxs each), so the index sees each twice while queued.
            let (block, trx) = (bid(1 + (i - 1) % 15), TrxId::new(format!("t{i}")).expect("trx id"));
            calls.push(tokio::spawn(async move { s.save_pending(&block, &trx, &Transform::default()).await }));
        }
        until_queued(&storage, 30).await;
        gate.send(()).expect("the gate is open");
        first.await.expect("joined").expect("the first write");
        for call in calls {
            call.await.expect("joined").expect("a queued write");
        }
        assert_eq!(storage.group_stats().writes, 2);
        assert_eq!(storage.stats().await.expect("stats").map(|s| s.blocks), Some(16));
        assert_eq!(storage.block_ids(None, 100).await.expect("ids").len(), 16);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_group_fails_every_batch_in_it_and_changes_nothing() {
        let (storage, entered, gate) = gated(2);
        let first = hold_first_write(&storage, entered).await;
        let mut calls = Vec::new();
        for i in 1..=10 {
            let s = storage.clone();
            calls.push(tokio::spawn(async move { s.save_pending(&bid(i), &tid(), &Transform::default()).await }));
        }
        until_queued(&storage, 10).await;
        gate.send(()).expect("the gate is open");
        first.await.expect("joined").expect("the first write");
        for call in calls {
            let outcome = call.await.expect("joined");
            assert!(matches!(outcome, Err(StorageError::Full(_))), "{outcome:?}");
        }
        for i in 1..=10 {
            assert_eq!(storage.pending(&bid(i), &tid()).await.expect("read"), None);
        }
        assert_eq!(storage.stats().await.expect("stats").map(|s| s.blocks), Some(1));
        // Nothing computed on the failed writes survives: the next block is counted from the store.
        storage.save_pending(&bid(11), &tid(), &Transform::default()).await.expect("a later write");
        assert_eq!(storage.stats().await.expect("stats").map(|s| s.blocks), Some(2));
        assert_eq!(storage.block_ids(None, 100).await.expect("ids"), vec![bid(0), bid(11)]);
    }

    fn commit(trx: &str) -> BlockCommit {
        let trx_id = TrxId::new(trx).expect("a valid trx id");
        BlockCommit { trx_id, rev: 1, transform: Transform::default(), value: None, prune_value_at: None }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_computed_on_queued_writes_waits_for_them() {
        // The first write (a commit at revision 1) fails: a second commit at revision 1, refused
        // meanwhile because the queued one takes that revision, must not report that refusal.
        let (storage, entered, gate) = gated(1);
        let first = {
            let s = storage.clone();
            tokio::spawn(async move { s.commit_block(&bid(0), &commit("a")).await })
        };
        tokio::task::spawn_blocking(move || entered.recv()).await.expect("joined").expect("the first write started");
        let second = {
            let s = storage.clone();
            tokio::spawn(async move { s.commit_block(&bid(0), &commit("b")).await })
        };
        until_queued(&storage, 1).await;
        assert!(!second.is_finished());
        gate.send(()).expect("the gate is open");
        assert!(matches!(first.await.expect("joined"), Err(StorageError::Full(_))));
        let second = second.await.expect("joined");
        assert!(matches!(second, Err(StorageError::Full(_))), "{second:?}");
        // Revision 1 is free: the refusal was never the store's state.
        storage.commit_block(&bid(0), &commit("b")).await.expect("the commit");
        assert_eq!(storage.latest(&bid(0)).await.expect("read").map(|l| l.trx_id), TrxId::new("b").ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_group_commit_leaves_no_value_to_read() {
        // The commit's group write fails: its value is not read back (the value cache keeps only
        // what was written), and a later commit of another value at that revision reads as itself.
        let (storage, entered, gate) = gated(1);
        let value = |field: &str| Some(Block::new(bid(0), "t", "c").with_field(field, serde_json::Value::Null));
        let first = {
            let s = storage.clone();
            let commit = BlockCommit { value: value("first"), ..commit("a") };
            tokio::spawn(async move { s.commit_block(&bid(0), &commit).await })
        };
        tokio::task::spawn_blocking(move || entered.recv()).await.expect("joined").expect("the first write started");
        gate.send(()).expect("the gate is open");
        assert!(matches!(first.await.expect("joined"), Err(StorageError::Full(_))));
        assert_eq!(storage.materialized(&bid(0), 1).await.expect("read"), None);
        let second = BlockCommit { value: value("second"), ..commit("b") };
        storage.commit_block(&bid(0), &second).await.expect("the commit");
        assert_eq!(storage.materialized(&bid(0), 1).await.expect("read"), Some(value("second")));
    }

    #[test]
    fn scans_see_queued_puts_and_deletes() {
        let group = GroupCommit::new();
        let store = Gated {
            map: Mutex::new([(b"pa".to_vec(), b"1".to_vec()), (b"pb".to_vec(), b"2".to_vec())].into_iter().collect()),
            writes: AtomicUsize::new(0),
            fail_at: 0,
            entered: Mutex::new(None),
            gate: Mutex::new(None),
        };
        let slots = Arc::new(Semaphore::new(2));
        let slot = || Slot(Arc::clone(&slots).try_acquire_owned().expect("a free slot"));
        let _a =
            group.enqueue(vec![KvWrite::delete(b"pa".to_vec()), KvWrite::put(b"pc".to_vec(), b"3".to_vec())], slot());
        let _b =
            group.enqueue(vec![KvWrite::put(b"pa".to_vec(), b"4".to_vec()), KvWrite::delete(b"pb".to_vec())], slot());
        let scanned = scan_through(&group, &store, b"p", b"p", 1).expect("scan");
        assert_eq!(scanned, vec![(b"pa".to_vec(), b"4".to_vec())]);
        let scanned = scan_through(&group, &store, b"p", b"pb", 10).expect("scan");
        assert_eq!(scanned, vec![(b"pc".to_vec(), b"3".to_vec())]);
        assert_eq!(group.overlay_get(b"pb"), Some(None));
        assert_eq!(group.overlay_get(b"px"), None);
    }
}

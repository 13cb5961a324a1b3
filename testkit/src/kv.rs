//! Contract tests of a [`KvStore`]: every store runs them with one macro call.
//!
//! ```text
//! // tests/kv.rs of a store crate
//! optimystic_testkit::kv_store_conformance!(|| {
//!     let dir = tempfile::tempdir().expect("temp dir");
//!     KvFixture::with_guard(MyStore::open(dir.path()).expect("open"), dir)
//! });
//! ```
//!
//! The macro expands to one `#[test]` per rule below, named after it. A rule gets a fresh, empty,
//! open store and panics with a message naming what failed. The block-level contract over the
//! same store is checked by running [`storage_conformance!`](crate::storage_conformance) on a
//! [`KvBlockStorage`](optimystic_core::kv::KvBlockStorage) over it.

// Test code shipped in the library: a failed check must panic (that is how a test fails).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use optimystic_core::error::StorageError;
use optimystic_core::kv::{KvEntry, KvStore, KvWrite, MAX_KEY_BYTES};

/// Batches the writer of [`kv_batches_are_never_seen_in_part`] writes.
pub const ATOMICITY_BATCHES: u64 = 200;
/// Keys each of those batches writes.
pub const ATOMICITY_KEYS: u8 = 8;

/// A fresh, empty store for one rule.
#[derive(Debug)]
pub struct KvFixture<S> {
    /// The store under test; empty and open when handed to a rule.
    pub store: S,
    /// Whatever must live as long as the store (a temporary directory); dropped after it.
    pub guard: Box<dyn Any + Send + Sync>,
}

impl<S: KvStore> KvFixture<S> {
    /// A fixture with nothing to keep alive.
    pub fn new(store: S) -> Self {
        Self { store, guard: Box::new(()) }
    }

    /// A fixture that keeps `guard` alive as long as the store.
    pub fn with_guard(store: S, guard: impl Any + Send + Sync) -> Self {
        Self { store, guard: Box::new(guard) }
    }
}

/// Expands to one `#[test]` per [`KvStore`] contract rule. The argument is a factory callable as
/// `Fn() -> KvFixture<S>`, called once per test; it must return an empty, open store each time.
#[macro_export]
macro_rules! kv_store_conformance {
    ($factory:expr $(,)?) => {
        $crate::__kv_store_conformance_tests! {
            $factory;
            kv_get_put_delete,
            kv_batch_applies_in_order,
            kv_failed_batch_changes_nothing,
            kv_batches_are_never_seen_in_part,
            kv_scan_prefix_start_limit,
            kv_flush_and_durability,
            kv_close_then_closed,
        }
    };
}

/// Implementation detail of [`kv_store_conformance!`]: one test per listed rule.
#[doc(hidden)]
#[macro_export]
macro_rules! __kv_store_conformance_tests {
    ($factory:expr; $($rule:ident),* $(,)?) => {
        $(
            #[test]
            fn $rule() {
                $crate::kv::$rule(($factory)());
            }
        )*
    };
}

fn put(key: &[u8], value: &[u8]) -> KvWrite {
    KvWrite::put(key, value)
}

fn del(key: &[u8]) -> KvWrite {
    KvWrite::delete(key)
}

fn all<S: KvStore>(store: &S) -> Vec<KvEntry> {
    store.scan(&[], &[], usize::MAX).expect("scan of everything")
}

/// Put, get, replace and delete (idempotent); empty values, binary keys and keys of
/// [`MAX_KEY_BYTES`] bytes; an empty key is never there.
pub fn kv_get_put_delete<S: KvStore>(fixture: KvFixture<S>) {
    let store = &fixture.store;
    assert_eq!(store.get(b"a").expect("get"), None);
    let long = vec![0xA5; MAX_KEY_BYTES];
    let binary: Vec<u8> = (0..=255u8).collect();
    for (key, value) in [(&b"a"[..], &b"1"[..]), (b"\x00", b""), (b"\xff\x00", &binary), (&long, b"max")] {
        store.write(&[put(key, value)], true).expect("put");
        assert_eq!(store.get(key).expect("get").as_deref(), Some(value), "value of a {}-byte key", key.len());
    }
    store.write(&[put(b"a", b"2")], true).expect("replace");
    store.write(&[put(b"a", b"2")], true).expect("replace again");
    assert_eq!(store.get(b"a").expect("get"), Some(b"2".to_vec()));
    for _ in 0..2 {
        store.write(&[del(b"a"), del(b"never")], true).expect("delete");
        assert_eq!(store.get(b"a").expect("get"), None);
    }
    assert_eq!(store.get(b"").expect("get of an empty key"), None);
    assert_eq!(all(store).len(), 3);
}

/// A batch applies in order: the last write of a key wins; an empty batch changes nothing.
pub fn kv_batch_applies_in_order<S: KvStore>(fixture: KvFixture<S>) {
    let store = &fixture.store;
    store.write(&[], true).expect("empty batch");
    store.write(&[put(b"keep", b"k")], true).expect("put");
    let batch = [put(b"a", b"1"), put(b"b", b"2"), del(b"a"), put(b"c", b"3"), put(b"b", b"22"), del(b"c")];
    for _ in 0..2 {
        store.write(&batch, true).expect("batch");
        let expected = [(b"b".to_vec(), b"22".to_vec()), (b"keep".to_vec(), b"k".to_vec())];
        assert_eq!(all(store), expected, "the last write of each key wins, the rest is untouched");
    }
}

/// A batch that fails (a put of an empty key, refused with [`StorageError::Invalid`]) changes
/// nothing, wherever the bad write stands in it.
pub fn kv_failed_batch_changes_nothing<S: KvStore>(fixture: KvFixture<S>) {
    let store = &fixture.store;
    store.write(&[put(b"a", b"1"), put(b"b", b"2")], true).expect("put");
    let before = all(store);
    let good = [put(b"a", b"changed"), del(b"b"), put(b"c", b"new")];
    for at in 0..=good.len() {
        let mut batch = good.to_vec();
        batch.insert(at, put(b"", b"empty key"));
        match store.write(&batch, true) {
            Err(StorageError::Invalid(_)) => {}
            other => panic!("a batch with an empty key at {at} must fail with Invalid, got {other:?}"),
        }
        assert_eq!(all(store), before, "a failed batch (bad write at {at}) changes nothing");
    }
}

/// Readers on other threads never see part of a batch: every batch sets all of
/// [`ATOMICITY_KEYS`] keys to one value, and every scan and get sees them equal.
pub fn kv_batches_are_never_seen_in_part<S: KvStore>(fixture: KvFixture<S>) {
    let store = Arc::new(fixture.store);
    let keys: Vec<Vec<u8>> = (0..ATOMICITY_KEYS).map(|k| vec![b'k', k]).collect();
    let batch = |n: u64| keys.iter().map(|k| put(k, &n.to_be_bytes())).collect::<Vec<_>>();
    store.write(&batch(0), true).expect("first batch");
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, done) = (Arc::clone(&store), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !done.load(Ordering::Acquire) || reads == 0 {
                    let seen = store.scan(b"k", b"k", usize::MAX).expect("scan");
                    assert_eq!(seen.len(), usize::from(ATOMICITY_KEYS), "every key is there");
                    assert!(seen.windows(2).all(|w| w[0].1 == w[1].1), "a scan saw part of a batch: {seen:?}");
                    reads += 1;
                }
            })
        })
        .collect();
    for n in 1..=ATOMICITY_BATCHES {
        // Written in reverse order half of the time, so a store applying writes one by one shows.
        let mut writes = batch(n);
        if n % 2 == 0 {
            writes.reverse();
        }
        store.write(&writes, n % 3 == 0).expect("batch");
    }
    done.store(true, Ordering::Release);
    for reader in readers {
        reader.join().expect("a reader failed");
    }
    let last = ATOMICITY_BATCHES.to_be_bytes().to_vec();
    assert!(all(store.as_ref()).iter().all(|(_, v)| *v == last), "the last batch wins");
}

/// `scan`: byte order (a shorter key first), only keys with the prefix, from `start` (a start
/// below the prefix starts at the prefix), at most `limit`; big-endian numbers sort numerically.
pub fn kv_scan_prefix_start_limit<S: KvStore>(fixture: KvFixture<S>) {
    let store = &fixture.store;
    let numbers = [0u64, 1, 255, 256, 1 << 40, u64::MAX];
    let mut batch: Vec<KvWrite> =
        numbers.iter().rev().map(|n| put(&[b"r/", &n.to_be_bytes()[..]].concat(), b"")).collect();
    for key in [&b"p"[..], b"p/", b"p/a", b"p/ab", b"p/b", b"p0", b"q", b"o\xff", b"p/\xff"] {
        batch.push(put(key, key));
    }
    store.write(&batch, true).expect("batch");
    let keys = |prefix: &[u8], start: &[u8], limit: usize| -> Vec<Vec<u8>> {
        store.scan(prefix, start, limit).expect("scan").into_iter().map(|(k, _)| k).collect()
    };
    let v = |keys: &[&[u8]]| keys.iter().map(|k| k.to_vec()).collect::<Vec<_>>();
    assert_eq!(keys(b"p/", b"", usize::MAX), v(&[b"p/", b"p/a", b"p/ab", b"p/b", b"p/\xff"]), "prefix, byte order");
    assert_eq!(keys(b"p", b"", usize::MAX), v(&[b"p", b"p/", b"p/a", b"p/ab", b"p/b", b"p/\xff", b"p0"]));
    assert_eq!(keys(b"p/", b"p/a\x00", usize::MAX), v(&[b"p/ab", b"p/b", b"p/\xff"]), "from start");
    assert_eq!(keys(b"p/", b"p/ab", 2), v(&[b"p/ab", b"p/b"]), "start included, limit");
    assert_eq!(keys(b"p/", b"p/c", usize::MAX), v(&[b"p/\xff"]));
    assert_eq!(keys(b"p/", b"q", usize::MAX), Vec::<Vec<u8>>::new(), "start past the prefix");
    assert_eq!(keys(b"p/", b"", 0), Vec::<Vec<u8>>::new(), "limit 0");
    assert_eq!(keys(b"p/", b"", 1), v(&[b"p/"]), "limit 1");
    assert_eq!(keys(b"x", b"", usize::MAX), Vec::<Vec<u8>>::new(), "no key with the prefix");
    assert_eq!(keys(b"", b"p0", 2), v(&[b"p0", b"q"]), "an empty prefix scans everything");
    let listed: Vec<u64> =
        keys(b"r/", b"", usize::MAX).iter().map(|k| u64::from_be_bytes(k[2..].try_into().expect("8 bytes"))).collect();
    assert_eq!(listed, numbers, "big-endian numbers in numeric order");
    let values = store.scan(b"p/a", b"", usize::MAX).expect("scan");
    assert_eq!(values, vec![(b"p/a".to_vec(), b"p/a".to_vec()), (b"p/ab".to_vec(), b"p/ab".to_vec())], "values");
}

/// Writes with `durable: false`, then `flush`, keep every batch; `flush` is idempotent.
pub fn kv_flush_and_durability<S: KvStore>(fixture: KvFixture<S>) {
    let store = &fixture.store;
    store.write(&[put(b"a", b"1")], false).expect("non-durable write");
    store.write(&[put(b"b", b"2")], true).expect("durable write");
    store.write(&[put(b"c", b"3")], false).expect("non-durable write");
    store.flush().expect("flush");
    store.flush().expect("flush again");
    assert_eq!(all(store).len(), 3, "every batch is there after flush");
}

/// After `close`, every call but `close` fails with [`StorageError::Closed`]; `close` is
/// idempotent.
pub fn kv_close_then_closed<S: KvStore>(fixture: KvFixture<S>) {
    let store = &fixture.store;
    store.write(&[put(b"a", b"1")], true).expect("put");
    store.close().expect("close");
    store.close().expect("close again");
    let closed = |what: &str, result: Result<(), StorageError>| match result {
        Err(StorageError::Closed { .. }) => {}
        other => panic!("{what} after close must fail with Closed, got {other:?}"),
    };
    closed("get", store.get(b"a").map(drop));
    closed("scan", store.scan(b"", b"", 10).map(drop));
    closed("write", store.write(&[put(b"b", b"2")], true));
    closed("empty write", store.write(&[], true));
    closed("flush", store.flush());
}

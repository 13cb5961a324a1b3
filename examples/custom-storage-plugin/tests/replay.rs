//! The write-ahead log across reopen: batches are replayed, a torn tail is cut off.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use optimystic_core::kv::{KvStore, KvWrite};
use optimystic_example_custom_storage::WalKv;

fn entries(store: &WalKv) -> Vec<(Vec<u8>, Vec<u8>)> {
    store.scan(b"", b"", usize::MAX).unwrap()
}

#[test]
fn batches_are_replayed_and_a_torn_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.log");
    let store = WalKv::open(&path).unwrap();
    store.write(&[KvWrite::put(&b"a"[..], &b"1"[..]), KvWrite::put(&b"b"[..], &b"2"[..])], true).unwrap();
    store.write(&[KvWrite::delete(&b"a"[..]), KvWrite::put(&b"c"[..], &b""[..])], false).unwrap();
    store.close().unwrap();
    let expected = vec![(b"b".to_vec(), b"2".to_vec()), (b"c".to_vec(), Vec::new())];
    let whole = std::fs::metadata(&path).unwrap().len();

    let store = WalKv::open(&path).unwrap();
    assert_eq!(entries(&store), expected, "replayed");
    drop(store);

    // A crash in the middle of an append: a header and half a payload, then junk.
    for tail in [&[40u8, 0, 0, 0, 1, 2, 3][..], &[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]] {
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(tail).unwrap();
        let store = WalKv::open(&path).unwrap();
        assert_eq!(entries(&store), expected, "the torn record is ignored");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole, "and cut off the log");
        store.write(&[KvWrite::put(&b"d"[..], &b"4"[..])], true).unwrap();
        store.write(&[KvWrite::delete(&b"d"[..])], true).unwrap();
        store.close().unwrap();
        assert_eq!(entries(&WalKv::open(&path).unwrap()), expected, "later batches follow whole records");
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(whole).unwrap();
    }
}

//! The decoded materialized values of a [`KvBlockStorage`](super::KvBlockStorage): a bounded
//! memo of JSON decoding, so that reading a block's newest value does not parse it again.
//!
//! Each entry holds, for one block, the revision of its newest committed value seen, the JSON
//! bytes that were stored for it and the value decoded. It is filled by `commit_block` once the
//! commit is written, with the value being committed (the value those bytes decode to: a block's
//! JSON round-trips, with serde_json's `preserve_order` and `float_roundtrip`), and used by
//! `materialized` only when the store still holds exactly those bytes at that revision: the read
//! still gets the stored bytes (so a closed store, a missing or pruned value and damaged bytes
//! answer as before) and compares them with the entry's instead of parsing them. Coherence thus
//! needs no invalidation: whatever writes the store (a later commit, a failed or pending group
//! write, a direct write to the store, `close`), an entry answers only for the bytes it was made
//! from.
//!
//! Bounds: at most [`VALUE_CACHE_BLOCKS`] entries and [`VALUE_CACHE_BYTES`] bytes of stored JSON
//! (the decoded copy takes about as much again); a value larger than [`VALUE_CACHE_BYTES`] is not
//! kept. Past a bound the least recently used entries go.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::storage::BlockValue;

/// The most blocks whose newest value is kept decoded (entries).
pub const VALUE_CACHE_BLOCKS: usize = 1_024;
/// The most bytes of stored JSON (16 MiB) whose decoded values are kept; the decoded values take
/// about as much memory again.
pub const VALUE_CACHE_BYTES: usize = 16 << 20;

/// One block's newest value seen.
#[derive(Debug)]
struct Entry {
    rev: u64,
    json: Vec<u8>,
    value: BlockValue,
    /// Position in [`Inner::order`]: larger is more recently used.
    used: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// By block prefix (`b<block>` of the key layout).
    entries: HashMap<Vec<u8>, Entry>,
    /// Use order: the block prefix of each entry by its `used`.
    order: BTreeMap<u64, Vec<u8>>,
    /// Stored JSON bytes of all entries.
    bytes: usize,
    next_use: u64,
}

impl Inner {
    fn touch(&mut self) -> u64 {
        self.next_use += 1;
        self.next_use
    }

    fn remove(&mut self, prefix: &[u8]) {
        if let Some(entry) = self.entries.remove(prefix) {
            self.order.remove(&entry.used);
            self.bytes -= entry.json.len();
        }
    }
}

/// The decoded values of one storage (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct ValueCache {
    inner: Mutex<Inner>,
}

impl ValueCache {
    // The cache is changed only by infallible map operations that keep it consistent between
    // them, so a thread that panicked while holding the lock left it usable.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The decoded value of `stored`, the bytes the store holds for the block's value at `rev`,
    /// when the cache has it.
    pub(crate) fn get(&self, prefix: &[u8], rev: u64, stored: &[u8]) -> Option<BlockValue> {
        let mut inner = self.lock();
        let used = inner.touch();
        let entry = inner.entries.get_mut(prefix).filter(|e| e.rev == rev && e.json == stored)?;
        let old = std::mem::replace(&mut entry.used, used);
        let value = entry.value.clone();
        inner.order.remove(&old);
        inner.order.insert(used, prefix.to_vec());
        Some(value)
    }

    /// Whether a value of `json_len` stored bytes at `rev` would be kept (a smaller, or not a
    /// newer, revision than the block's entry is not): lets callers skip copying it.
    pub(crate) fn admits(&self, prefix: &[u8], rev: u64, json_len: usize) -> bool {
        json_len <= VALUE_CACHE_BYTES && self.lock().entries.get(prefix).is_none_or(|e| e.rev < rev)
    }

    /// Keeps `value`, decoded from `json`, as the block's value at `rev`, unless the block's entry
    /// is at `rev` or newer already; then drops the least recently used entries past the bounds.
    pub(crate) fn put(&self, prefix: Vec<u8>, rev: u64, json: Vec<u8>, value: BlockValue) {
        if json.len() > VALUE_CACHE_BYTES {
            return;
        }
        let mut inner = self.lock();
        if inner.entries.get(&prefix).is_some_and(|e| e.rev >= rev) {
            return;
        }
        inner.remove(&prefix);
        let used = inner.touch();
        inner.bytes += json.len();
        inner.order.insert(used, prefix.clone());
        inner.entries.insert(prefix, Entry { rev, json, value, used });
        while inner.entries.len() > VALUE_CACHE_BLOCKS || inner.bytes > VALUE_CACHE_BYTES {
            let Some((_, oldest)) = inner.order.pop_first() else { break };
            inner.remove(&oldest);
        }
    }

    /// Drops every entry.
    pub(crate) fn clear(&self) {
        *self.lock() = Inner::default();
    }

    /// Entries and stored JSON bytes kept now.
    #[cfg(test)]
    pub(crate) fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::model::{Block, BlockId};

    fn value(id: &str) -> BlockValue {
        Some(Block::new(BlockId::new(id).unwrap(), "t", "c"))
    }

    #[test]
    fn answers_only_for_its_own_bytes_and_revision() {
        let cache = ValueCache::default();
        cache.put(b"ba".to_vec(), 2, b"two".to_vec(), value("a"));
        assert_eq!(cache.get(b"ba", 2, b"two"), Some(value("a")));
        assert_eq!(cache.get(b"ba", 2, b"other"), None);
        assert_eq!(cache.get(b"ba", 1, b"two"), None);
        assert_eq!(cache.get(b"bb", 2, b"two"), None);
        // An older revision does not replace a newer one; a newer one does.
        assert!(!cache.admits(b"ba", 1, 3));
        cache.put(b"ba".to_vec(), 1, b"one".to_vec(), None);
        assert_eq!(cache.get(b"ba", 2, b"two"), Some(value("a")));
        cache.put(b"ba".to_vec(), 3, b"three".to_vec(), None);
        assert_eq!(cache.get(b"ba", 2, b"two"), None);
        assert_eq!(cache.get(b"ba", 3, b"three"), Some(None));
        assert_eq!(cache.size(), (1, 5));
    }

    #[test]
    fn keeps_within_its_bounds_dropping_the_least_recently_used() {
        let cache = ValueCache::default();
        for n in 0..VALUE_CACHE_BLOCKS + 10 {
            cache.put(format!("b{n}").into_bytes(), 1, vec![b'x'; 10], None);
            // Block 0 stays in use.
            assert_eq!(cache.get(b"b0", 1, &[b'x'; 10]), Some(None));
        }
        assert_eq!(cache.size(), (VALUE_CACHE_BLOCKS, VALUE_CACHE_BLOCKS * 10));
        assert_eq!(cache.get(b"b1", 1, &[b'x'; 10]), None);
        assert_eq!(cache.get(b"b0", 1, &[b'x'; 10]), Some(None));

        let half = VALUE_CACHE_BYTES / 2;
        cache.put(b"big1".to_vec(), 1, vec![0; half], None);
        cache.put(b"big2".to_vec(), 1, vec![0; half], None);
        let (entries, bytes) = cache.size();
        assert!(bytes <= VALUE_CACHE_BYTES && entries >= 2, "{entries} entries, {bytes} bytes");
        assert_eq!(cache.get(b"big1", 1, &vec![0; half]), Some(None));

        // Too large to keep at all.
        assert!(!cache.admits(b"huge", 1, VALUE_CACHE_BYTES + 1));
        cache.put(b"huge".to_vec(), 1, vec![0; VALUE_CACHE_BYTES + 1], None);
        assert_eq!(cache.get(b"huge", 1, &vec![0; VALUE_CACHE_BYTES + 1]), None);
    }
}

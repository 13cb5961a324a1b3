//! [`KeyNetwork`] over the node's Kademlia DHT, registered as `key-network kademlia`.
//!
//! The cluster of a block is the `cluster_size` peers closest to `sha256(blockId)` by the XOR
//! distance of their DHT keys ([`rank_peers`], the same ranking the static key network uses),
//! chosen among this node and the peers of its routing table (read through [`PeerRouting`]). When
//! the table holds fewer than `cluster_size - 1` peers, an iterative DHT lookup adds the peers it
//! finds. Answers are cached per block for a short TTL and dropped as soon as the routing epoch
//! changes, so a view that changes with churn changes the answer.
//!
//! Configuration: `{"kind": "kademlia", "cluster_size": 3, "cache_ttl_ms": 2000}`, both optional;
//! `cache_ttl_ms = 0` disables the cache. Works over the host's routing ([`KeyNetworkContext::routing`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use optimystic_core::BlockId;
use optimystic_core::identity::PeerId;
use optimystic_core::keynet::{
    ClusterPeers, ClusterSize, KeyNetwork, KeyNetworkError, PeerRouting, block_key, rank_peers,
};
pub use optimystic_core::keynet::{DEFAULT_CLUSTER_SIZE, MAX_CLUSTER_SIZE};
use optimystic_core::registry::{KeyNetworkContext, PluginConfig, PluginDescriptor, PluginError, parse_config};
use serde::Deserialize;
use serde_json::Value;

/// How long a computed cluster is reused when the configuration names no TTL.
pub const DEFAULT_CACHE_TTL_MS: u64 = 2_000;
/// The largest accepted cache TTL.
pub const MAX_CACHE_TTL_MS: u64 = 60_000;
/// Cached clusters kept at most; past it expired entries are dropped, then all.
pub const MAX_CACHE_ENTRIES: usize = 16_384;
const PLUGIN: &str = "key-network kademlia";

/// A cached answer: the cluster, closest first, with the peers' addresses.
#[derive(Debug, Clone)]
struct Cached {
    at: Instant,
    ranked: Vec<PeerId>,
    cluster: ClusterPeers,
}

#[derive(Debug, Default)]
struct Cache {
    epoch: u64,
    entries: HashMap<BlockId, Cached>,
}

/// A key network over the DHT routing of the node host.
#[derive(Debug)]
pub struct KademliaKeyNetwork {
    routing: Arc<dyn PeerRouting>,
    cluster_size: usize,
    cache_ttl: Duration,
    cache: Mutex<Cache>,
    /// Peers returned by DHT lookups or seen live in the routing table (bounded by
    /// [`MAX_SEEN_PEERS`]), for [`KeyNetwork::has_seen`].
    seen: Mutex<HashSet<PeerId>>,
}

/// Most peers remembered from DHT lookups.
pub const MAX_SEEN_PEERS: usize = 4_096;

impl KademliaKeyNetwork {
    /// A key network over `routing` with `cluster_size` peers per cluster (at least one) and
    /// clusters cached for `cache_ttl_ms` (0: no cache).
    pub fn new(routing: Arc<dyn PeerRouting>, cluster_size: usize, cache_ttl_ms: u64) -> Self {
        Self {
            routing,
            cluster_size: cluster_size.clamp(1, MAX_CLUSTER_SIZE),
            cache_ttl: Duration::from_millis(cache_ttl_ms.min(MAX_CACHE_TTL_MS)),
            cache: Mutex::new(Cache::default()),
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// Builds from the plugin's configuration section (see the crate documentation).
    pub fn from_config(routing: Arc<dyn PeerRouting>, config: &Value) -> Result<Self, PluginError> {
        let config: KademliaConfig = parse_config(PLUGIN, config)?;
        Ok(Self::new(routing, config.cluster_size.get(), config.cache_ttl_ms))
    }

    fn cached(&self, block_id: &BlockId, epoch: u64) -> Option<Cached> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.epoch != epoch {
            cache.entries.clear();
            cache.epoch = epoch;
            return None;
        }
        let hit = cache.entries.get(block_id)?;
        (hit.at.elapsed() < self.cache_ttl).then(|| hit.clone())
    }

    fn remember(&self, block_id: &BlockId, epoch: u64, answer: &Cached) {
        if self.cache_ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.epoch != epoch {
            // The view changed while this answer was computed: it may already be stale.
            return;
        }
        if cache.entries.len() >= MAX_CACHE_ENTRIES {
            let ttl = self.cache_ttl;
            cache.entries.retain(|_, c| c.at.elapsed() < ttl);
            if cache.entries.len() >= MAX_CACHE_ENTRIES {
                cache.entries.clear();
            }
        }
        cache.entries.insert(block_id.clone(), answer.clone());
    }

    /// Remembers peers for [`KeyNetwork::has_seen`] (bounded by [`MAX_SEEN_PEERS`]): a peer stays
    /// seen after the host leaves it out of the routing table's live peers.
    fn remember_seen<'a>(&self, peers: impl Iterator<Item = &'a PeerId>) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        for peer in peers {
            if seen.len() >= MAX_SEEN_PEERS {
                break;
            }
            seen.insert(*peer);
        }
    }

    /// The block's cluster, closest first, computed or cached.
    async fn resolve(&self, block_id: &BlockId) -> Result<Cached, KeyNetworkError> {
        let epoch = self.routing.routing_epoch();
        if let Some(hit) = self.cached(block_id, epoch) {
            return Ok(hit);
        }
        let key = block_key(block_id);
        let local = self.routing.local_peer_id();
        let mut candidates = self.routing.known_peers().await;
        self.remember_seen(candidates.keys());
        candidates.entry(local).or_default();
        if candidates.len() < self.cluster_size {
            match self.routing.closest_peers(block_id).await {
                Ok(found) => {
                    self.remember_seen(found.keys());
                    for (peer, info) in found {
                        let known = candidates.entry(peer).or_default();
                        for addr in info.multiaddrs {
                            if !known.multiaddrs.contains(&addr) {
                                known.multiaddrs.push(addr);
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(%block_id, error = %e, "DHT lookup failed; using the routing table"),
            }
        }
        let ranked = rank_peers(&key, candidates.keys(), self.cluster_size);
        let cluster: ClusterPeers =
            ranked.iter().map(|peer| (*peer, candidates.remove(peer).unwrap_or_default())).collect();
        if cluster.is_empty() {
            return Err(KeyNetworkError::NoPeers);
        }
        let answer = Cached { at: Instant::now(), ranked, cluster };
        self.remember(block_id, epoch, &answer);
        Ok(answer)
    }
}

#[async_trait]
impl KeyNetwork for KademliaKeyNetwork {
    /// See [`KeyNetwork::find_cluster`]. This node is always a candidate, so the answer is never
    /// empty; with no other peer known it is this node alone.
    async fn find_cluster(&self, block_id: &BlockId) -> Result<ClusterPeers, KeyNetworkError> {
        Ok(self.resolve(block_id).await?.cluster)
    }

    async fn find_coordinator(&self, block_id: &BlockId, excluded: &[PeerId]) -> Result<PeerId, KeyNetworkError> {
        let excluded: BTreeSet<&PeerId> = excluded.iter().collect();
        self.resolve(block_id)
            .await?
            .ranked
            .into_iter()
            .find(|p| !excluded.contains(p))
            .ok_or(KeyNetworkError::AllExcluded)
    }

    async fn ranked(&self, block_id: &BlockId, n: usize) -> Result<Vec<PeerId>, KeyNetworkError> {
        let mut candidates = self.routing.known_peers().await;
        candidates.entry(self.routing.local_peer_id()).or_default();
        Ok(rank_peers(&block_key(block_id), candidates.keys(), n))
    }

    fn cluster_size(&self) -> usize {
        self.cluster_size
    }

    /// This node, a peer in the routing table, or a peer an earlier DHT lookup returned.
    async fn has_seen(&self, peer: &PeerId) -> bool {
        if *peer == self.routing.local_peer_id()
            || self.seen.lock().unwrap_or_else(PoisonError::into_inner).contains(peer)
        {
            return true;
        }
        self.routing.known_peers().await.contains_key(peer)
    }
}

/// The configuration section (see the crate documentation).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct KademliaConfig {
    cluster_size: ClusterSize,
    cache_ttl_ms: u64,
}

impl Default for KademliaConfig {
    fn default() -> Self {
        Self { cluster_size: ClusterSize::default(), cache_ttl_ms: DEFAULT_CACHE_TTL_MS }
    }
}

impl PluginConfig for KademliaConfig {
    fn validate(&self) -> Result<(), PluginError> {
        if self.cache_ttl_ms > MAX_CACHE_TTL_MS {
            return Err(PluginError::Config {
                plugin: PLUGIN.to_owned(),
                message: format!("cache_ttl_ms {} must be between 0 and {MAX_CACHE_TTL_MS}", self.cache_ttl_ms),
            });
        }
        Ok(())
    }
}

fn check(config: &Value) -> Result<(), PluginError> {
    parse_config::<KademliaConfig>(PLUGIN, config).map(drop)
}

fn build(cx: &KeyNetworkContext, config: &Value) -> Result<Arc<dyn KeyNetwork>, PluginError> {
    Ok(Arc::new(KademliaKeyNetwork::from_config(Arc::clone(&cx.routing), config)?))
}

/// The options' defaults.
fn defaults() -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("cluster_size".to_owned(), Value::from(DEFAULT_CLUSTER_SIZE));
    map.insert("cache_ttl_ms".to_owned(), Value::from(DEFAULT_CACHE_TTL_MS));
    map
}

optimystic_core::inventory::submit! {
    PluginDescriptor::key_network("kademlia", "clusters ranked over the Kademlia DHT routing table", build)
        .with_defaults(defaults)
        .with_check(check)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use optimystic_core::keynet::PeerInfo;
    use optimystic_core::registry::{PluginKind, Registry};
    use serde_json::json;

    use super::*;

    /// A routing view with a settable table, lookup answer and epoch, counting calls.
    #[derive(Debug)]
    struct FakeRouting {
        local: PeerId,
        table: Mutex<ClusterPeers>,
        lookup: ClusterPeers,
        epoch: AtomicU64,
        table_reads: AtomicUsize,
        lookups: AtomicUsize,
    }

    impl FakeRouting {
        fn new(table: &[PeerId], lookup: &[PeerId]) -> Arc<Self> {
            let info = |p: &PeerId| (*p, PeerInfo { multiaddrs: vec![format!("/ip4/127.0.0.1/tcp/1/p2p/{p}")] });
            Arc::new(Self {
                local: PeerId::random(),
                table: Mutex::new(table.iter().map(info).collect()),
                lookup: lookup.iter().map(info).collect(),
                epoch: AtomicU64::new(0),
                table_reads: AtomicUsize::new(0),
                lookups: AtomicUsize::new(0),
            })
        }
    }

    #[async_trait]
    impl PeerRouting for FakeRouting {
        fn local_peer_id(&self) -> PeerId {
            self.local
        }
        async fn known_peers(&self) -> ClusterPeers {
            self.table_reads.fetch_add(1, Ordering::SeqCst);
            self.table.lock().unwrap().clone()
        }
        async fn closest_peers(&self, _block_id: &BlockId) -> Result<ClusterPeers, KeyNetworkError> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            Ok(self.lookup.clone())
        }
        fn routing_epoch(&self) -> u64 {
            self.epoch.load(Ordering::SeqCst)
        }
    }

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    fn block(i: usize) -> BlockId {
        BlockId::new(format!("block-{i}")).unwrap()
    }

    #[tokio::test]
    async fn cluster_is_the_ranking_of_self_and_the_routing_table() {
        let table = peers(6);
        let routing = FakeRouting::new(&table, &[]);
        let network = KademliaKeyNetwork::new(routing.clone(), 3, 0);
        let mut everyone = table.clone();
        everyone.push(routing.local);
        for i in 0..20 {
            let expected = rank_peers(&block_key(&block(i)), &everyone, 3);
            let cluster = network.find_cluster(&block(i)).await.unwrap();
            assert_eq!(cluster.keys().copied().collect::<BTreeSet<_>>(), expected.iter().copied().collect());
            assert_eq!(network.find_coordinator(&block(i), &[]).await.unwrap(), expected[0]);
            assert_eq!(network.find_coordinator(&block(i), &expected[..2]).await.unwrap(), expected[2]);
            assert_eq!(network.find_coordinator(&block(i), &expected).await, Err(KeyNetworkError::AllExcluded));
        }
        assert_eq!(routing.lookups.load(Ordering::SeqCst), 0, "a full table needs no lookup");
    }

    #[tokio::test]
    async fn a_small_table_is_completed_by_a_lookup_and_alone_is_self() {
        let found = peers(4);
        let routing = FakeRouting::new(&found[..1], &found);
        let network = KademliaKeyNetwork::new(routing.clone(), 3, 0);
        let cluster = network.find_cluster(&block(1)).await.unwrap();
        assert_eq!(cluster.len(), 3);
        assert_eq!(routing.lookups.load(Ordering::SeqCst), 1);

        let lonely = FakeRouting::new(&[], &[]);
        let network = KademliaKeyNetwork::new(lonely.clone(), 3, 0);
        let cluster = network.find_cluster(&block(1)).await.unwrap();
        assert_eq!(cluster.keys().copied().collect::<Vec<_>>(), vec![lonely.local]);
    }

    #[tokio::test]
    async fn answers_are_cached_until_the_epoch_changes() {
        let table = peers(5);
        let routing = FakeRouting::new(&table, &[]);
        let network = KademliaKeyNetwork::new(routing.clone(), 3, 60_000);
        let first = network.find_cluster(&block(7)).await.unwrap();
        assert_eq!(network.find_cluster(&block(7)).await.unwrap(), first);
        assert_eq!(routing.table_reads.load(Ordering::SeqCst), 1);

        // A new peer joins and the epoch moves: the next answer is recomputed.
        let newcomer = PeerId::random();
        routing.table.lock().unwrap().insert(newcomer, PeerInfo::default());
        routing.epoch.fetch_add(1, Ordering::SeqCst);
        network.find_cluster(&block(7)).await.unwrap();
        assert_eq!(routing.table_reads.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn configuration_and_registration() {
        let routing = FakeRouting::new(&[], &[]);
        let network =
            KademliaKeyNetwork::from_config(routing.clone(), &json!({"kind": "kademlia", "cluster_size": 5})).unwrap();
        assert_eq!(network.cluster_size(), 5);
        assert_eq!(KademliaKeyNetwork::from_config(routing.clone(), &Value::Null).unwrap().cluster_size(), 3);
        for bad in [json!({"cluster_size": 0}), json!({"cache_ttl_ms": -1}), json!({"other": 1}), json!([1])] {
            assert!(KademliaKeyNetwork::from_config(routing.clone(), &bad).is_err(), "{bad} accepted");
        }

        let cx = KeyNetworkContext { local_peer_id: routing.local, routing: routing.clone() };
        let registry = Registry::linked();
        assert_eq!(registry.build_key_network("kademlia", &cx, &json!({"cluster_size": 4})).unwrap().cluster_size(), 4);

        let declared = registry.defaults(PluginKind::KeyNetwork, "kademlia").unwrap().clone();
        let network = KademliaKeyNetwork::from_config(routing, &Value::Object(declared)).unwrap();
        assert_eq!(
            (network.cluster_size(), network.cache_ttl),
            (DEFAULT_CLUSTER_SIZE, Duration::from_millis(DEFAULT_CACHE_TTL_MS))
        );
    }
}

//! Operator requests: `status` (what a node is connected to, whether it is ready, what it stores,
//! what it has done) and `locate` (a block's cluster as a node sees it, and each member's newest
//! revision of the block). The `optimystic status` and `optimystic locate` commands send them.
//!
//! They travel on the repo protocol, framed like every request (SPEC 3.1), as a top-level object
//! with `node` in place of `operations`:
//!
//! - `{"node": {"op": "status"}, "expiration": ms}` answers a [`NodeStatus`];
//! - `{"node": {"op": "locate", "blockId": id}, "expiration": ms}` answers a [`Location`].
//!
//! A malformed one (unknown op, unknown or missing field, invalid block id) is answered
//! `bad-request`, an expired one `expired`, one past [`MAX_OPERATOR_REQUESTS_IN_FLIGHT`] (or past
//! [`MAX_OPERATOR_REQUESTS_PER_PEER`] from its sender) `busy`, and
//! on a node that serves none `unavailable`; none of them changes anything. Other nodes answer
//! them `bad-request` (not a repo message).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use libp2p::Multiaddr;
use libp2p::identity::PeerId;
use libp2p::multiaddr::Protocol;
use optimystic_core::client::RepoClient;
use optimystic_core::keynet::{KeyNetwork, block_key, rank_peers};
use optimystic_core::network::{NetworkError, PeerNetwork, ProtocolKind};
use optimystic_core::time::now_ms;
use optimystic_core::{BlockGets, BlockId, ErrorCode, MessageOptions, RawStorage, ReadMode, Repo, RepoError, TrxRev};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::host::HostHandle;
use crate::metrics::Metrics;
use crate::readiness::plural;
use crate::service::{envelope, error_value};

/// Operator requests handled at once by one node; more are answered `busy`.
pub const MAX_OPERATOR_REQUESTS_IN_FLIGHT: usize = 4;
/// Operator requests from one peer handled at once (SPEC 4.10: one peer cannot take every slot;
/// the CLI sends one at a time); more from that peer are answered `busy`.
pub const MAX_OPERATOR_REQUESTS_PER_PEER: usize = 1;
/// The longest `locate` waits for one member's answer (less when the request expires sooner).
pub const LOCATE_MEMBER_TIMEOUT_MS: u64 = 3_000;
/// The longest `status` waits for the storage engine's figures.
pub const STORAGE_STATS_TIMEOUT_MS: u64 = 1_000;

/// An operator request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OperatorRequest {
    /// The node's [`NodeStatus`].
    Status,
    /// The block's [`Location`].
    Locate {
        /// The block.
        block_id: BlockId,
    },
}

impl OperatorRequest {
    /// Whether a repo-protocol request is an operator request (an object with a `node` key).
    pub fn is_operator_request(value: &Value) -> bool {
        value.as_object().is_some_and(|map| map.contains_key("node"))
    }

    /// The request as sent: `{"node": {...}, "expiration": expiration_ms}`.
    pub fn to_message(&self, expiration_ms: u64) -> Value {
        let node = match self {
            Self::Status => json!({"op": "status"}),
            Self::Locate { block_id } => json!({"op": "locate", "blockId": block_id}),
        };
        json!({"node": node, "expiration": expiration_ms})
    }

    /// Parses a request as sent; returns it with its expiration, or why it is malformed.
    pub fn parse(value: &Value) -> Result<(Self, u64), String> {
        let message = value.as_object().ok_or("an operator request is a JSON object")?;
        only_fields(message, "the operator request", &["node", "expiration"])?;
        let expiration = message
            .get("expiration")
            .ok_or("the operator request has no \"expiration\"")?
            .as_u64()
            .ok_or("\"expiration\" must be a whole number of milliseconds since the Unix epoch")?;
        let node = message
            .get("node")
            .and_then(Value::as_object)
            .ok_or(r#""node" must be an object such as {"op": "status"}"#)?;
        let op = node.get("op").and_then(Value::as_str).ok_or(r#""node" has no "op" string"#)?;
        let request = match op {
            "status" => {
                only_fields(node, "status", &["op"])?;
                Self::Status
            }
            "locate" => {
                only_fields(node, "locate", &["op", "blockId"])?;
                let id = node.get("blockId").and_then(Value::as_str).ok_or(r#"locate needs a "blockId" string"#)?;
                Self::Locate { block_id: BlockId::new(id).map_err(|e| format!("locate: blockId: {e}"))? }
            }
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(format!("unknown operator request {shown:?}; expected \"status\" or \"locate\""));
            }
        };
        Ok((request, expiration))
    }
}

fn only_fields(map: &Map<String, Value>, what: &str, allowed: &[&str]) -> Result<(), String> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => {
            let shown: String = unknown.chars().take(64).collect();
            Err(format!("{what}: unknown field {shown:?} (expected {})", allowed.join(", ")))
        }
        None => Ok(()),
    }
}

/// Serves operator requests (see the module documentation).
#[async_trait]
pub trait OperatorHandler: Send + Sync + std::fmt::Debug + 'static {
    /// Answers one well-formed request that expires at `expiration_ms`.
    async fn handle(&self, request: OperatorRequest, expiration_ms: u64) -> Result<Value, RepoError>;
}

/// The operator request slots of a node: [`MAX_OPERATOR_REQUESTS_IN_FLIGHT`] in all, at most
/// [`MAX_OPERATOR_REQUESTS_PER_PEER`] of them taken by one peer.
#[derive(Debug, Default)]
pub(crate) struct OperatorSlots {
    /// Requests in flight per peer (peers with none are not kept, so the map holds at most
    /// [`MAX_OPERATOR_REQUESTS_IN_FLIGHT`] entries).
    taken: Mutex<HashMap<PeerId, usize>>,
}

/// A taken operator request slot, given back when dropped.
#[derive(Debug)]
pub(crate) struct OperatorSlot<'a> {
    slots: &'a OperatorSlots,
    peer: PeerId,
}

impl OperatorSlots {
    /// A slot for a request from `peer`, or why there is none (the `busy` message).
    fn take(&self, peer: PeerId) -> Result<OperatorSlot<'_>, String> {
        let mut taken = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        let in_flight: usize = taken.values().sum();
        if in_flight >= MAX_OPERATOR_REQUESTS_IN_FLIGHT {
            return Err(format!("{MAX_OPERATOR_REQUESTS_IN_FLIGHT} operator requests in flight; retry later"));
        }
        let of_peer = taken.entry(peer).or_default();
        if *of_peer >= MAX_OPERATOR_REQUESTS_PER_PEER {
            return Err(format!(
                "{MAX_OPERATOR_REQUESTS_PER_PEER} operator request(s) from this peer in flight; retry later"
            ));
        }
        *of_peer += 1;
        Ok(OperatorSlot { slots: self, peer })
    }
}

impl Drop for OperatorSlot<'_> {
    fn drop(&mut self) {
        let mut taken = self.slots.taken.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(of_peer) = taken.get_mut(&self.peer) {
            *of_peer = of_peer.saturating_sub(1);
            if *of_peer == 0 {
                taken.remove(&self.peer);
            }
        }
    }
}

/// Answers one operator request frame from `sender` with `handler`, within `slots`.
pub(crate) async fn serve(
    handler: Option<Arc<dyn OperatorHandler>>,
    slots: &OperatorSlots,
    sender: PeerId,
    value: &Value,
) -> Value {
    let (request, expiration) = match OperatorRequest::parse(value) {
        Ok(parsed) => parsed,
        Err(message) => {
            return envelope(ErrorCode::BadRequest, format!("operator request: {message}"));
        }
    };
    if expiration < now_ms() {
        return envelope(ErrorCode::Expired, format!("operator request expired at {expiration} ms"));
    }
    let Some(handler) = handler else {
        return envelope(ErrorCode::Unavailable, "this node does not serve operator requests (yet)");
    };
    let _slot = match slots.take(sender) {
        Ok(slot) => slot,
        Err(message) => return envelope(ErrorCode::Busy, message),
    };
    match handler.handle(request, expiration).await {
        Ok(answer) => answer,
        Err(e) => error_value(&e),
    }
}

/// The answer to `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The node's peer id.
    pub peer_id: String,
    /// Its listen addresses, with `/p2p/<peer id>`.
    pub listen_addrs: Vec<String>,
    /// The peers it has a connection to (at most the host's `max_connections`).
    pub connected_peers: Vec<String>,
    /// Peers in its Kademlia routing table, connected or not.
    pub routing_table_peers: usize,
    /// Whether it is ready (as `/ready` says).
    pub ready: bool,
    /// Why it is (not) ready.
    pub ready_detail: String,
    /// Its storage.
    pub storage: StorageStatus,
    /// Its key network.
    pub key_network: KeyNetworkStatus,
    /// Its consensus.
    pub consensus: ConsensusStatus,
    /// Repo operations it served since it started, by operation, then by outcome (`ok`, `stale`
    /// or an error code).
    pub operations: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Storage figures in a [`NodeStatus`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageStatus {
    /// The storage plugin (`memory`, `file`, `lmdb`, ...).
    pub kind: String,
    /// Whether it survives a restart.
    pub durable: bool,
    /// Blocks stored, when the engine can tell cheaply (`memory` and `lmdb` can, `file` cannot).
    pub blocks: Option<u64>,
    /// Bytes used, when the engine can tell cheaply.
    pub bytes: Option<u64>,
    /// Why `blocks` is absent, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Key-network figures in a [`NodeStatus`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyNetworkStatus {
    /// The key-network plugin (`kademlia`, `static`, ...).
    pub kind: String,
    /// Peers per block cluster.
    pub cluster_size: usize,
}

/// Consensus figures in a [`NodeStatus`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsensusStatus {
    /// The consensus plugin (`majority-2pc`, `solo`, ...).
    pub kind: String,
    /// Rounds this node coordinated since it started, by outcome (`committed`, `stale` or an error
    /// code).
    pub rounds: BTreeMap<String, u64>,
}

/// The answer to `locate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Location {
    /// The block.
    pub block_id: String,
    /// The peer id of the node that answered (whose view this is).
    pub seen_by: String,
    /// The cluster size its key network targets.
    pub cluster_size: usize,
    /// The block's cluster as that node sees it, closest to the block first.
    pub members: Vec<MemberState>,
}

/// One cluster member in a [`Location`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberState {
    /// The member's peer id.
    pub peer_id: String,
    /// Its known addresses.
    pub multiaddrs: Vec<String>,
    /// Whether it is the node that answered.
    #[serde(rename = "self")]
    pub is_self: bool,
    /// Whether it answered.
    pub reachable: bool,
    /// Its newest committed revision of the block (`null`: it has none, or it did not answer).
    pub latest: Option<TrxRev>,
    /// Why it did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The plugin names a node was built with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginKinds {
    /// `storage.kind`.
    pub storage: String,
    /// `key_network.kind`.
    pub key_network: String,
    /// `consensus.kind`.
    pub consensus: String,
}

/// The operator side of a full node.
#[derive(Debug)]
pub struct NodeOperator {
    host: HostHandle,
    storage: Arc<dyn RawStorage>,
    key_network: Arc<dyn KeyNetwork>,
    metrics: Arc<Metrics>,
    kinds: PluginKinds,
}

impl NodeOperator {
    /// The operator side of the node made of these parts.
    pub fn new(
        host: HostHandle,
        storage: Arc<dyn RawStorage>,
        key_network: Arc<dyn KeyNetwork>,
        metrics: Arc<Metrics>,
        kinds: PluginKinds,
    ) -> Self {
        Self { host, storage, key_network, metrics, kinds }
    }

    /// The node's status now.
    pub async fn status(&self) -> NodeStatus {
        let connectivity = self.host.connectivity().borrow().clone();
        let readiness = self.metrics.readiness();
        let stats = tokio::time::timeout(Duration::from_millis(STORAGE_STATS_TIMEOUT_MS), self.storage.stats()).await;
        let (blocks, bytes, note) = match stats {
            Ok(Ok(Some(stats))) => (Some(stats.blocks), stats.bytes, None),
            Ok(Ok(None)) => {
                (None, None, Some(format!("the {} engine does not count blocks cheaply", self.kinds.storage)))
            }
            Ok(Err(e)) => (None, None, Some(format!("storage figures failed: {e}"))),
            Err(_) => (None, None, Some(format!("storage figures took longer than {STORAGE_STATS_TIMEOUT_MS} ms"))),
        };
        NodeStatus {
            peer_id: self.host.local_peer_id().to_string(),
            listen_addrs: self.host.p2p_addrs().iter().map(ToString::to_string).collect(),
            connected_peers: connectivity.connected.iter().map(ToString::to_string).collect(),
            routing_table_peers: connectivity.routing_table_peers,
            ready: readiness.ready,
            ready_detail: readiness.detail,
            storage: StorageStatus {
                kind: self.kinds.storage.clone(),
                durable: self.storage.durable(),
                blocks,
                bytes,
                note,
            },
            key_network: KeyNetworkStatus {
                kind: self.kinds.key_network.clone(),
                cluster_size: self.key_network.cluster_size(),
            },
            consensus: ConsensusStatus { kind: self.kinds.consensus.clone(), rounds: self.metrics.round_totals() },
            operations: self.metrics.operation_totals(),
        }
    }

    /// The block's cluster as this node's key network finds it, and each member's newest revision
    /// of the block: this node's from its storage, the others' from a `get` in read mode `local`,
    /// all at once, each bounded by [`LOCATE_MEMBER_TIMEOUT_MS`] and by `expiration_ms`.
    pub async fn locate(&self, block_id: &BlockId, expiration_ms: u64) -> Result<Location, RepoError> {
        let cluster = self
            .key_network
            .find_cluster(block_id)
            .await
            .map_err(|e| RepoError::Unavailable(format!("cluster of {block_id}: {e}")))?;
        let me = self.host.local_peer_id();
        let ranked = rank_peers(&block_key(block_id), cluster.keys(), cluster.len());
        // Leave the requester time to receive the answer: wait at most half of what is left.
        let left_ms = expiration_ms.saturating_sub(now_ms()) / 2;
        let timeout_ms = LOCATE_MEMBER_TIMEOUT_MS.min(left_ms).max(1);
        let network: Arc<dyn PeerNetwork> = Arc::new(self.host.clone());
        let asks = ranked.into_iter().map(|peer| {
            let mut multiaddrs = cluster.get(&peer).map(|info| plain_addrs(&info.multiaddrs)).unwrap_or_default();
            if peer == me && multiaddrs.is_empty() {
                multiaddrs = self.host.listen_addrs().iter().map(ToString::to_string).collect();
            }
            let network = Arc::clone(&network);
            async move {
                let answer = if peer == me {
                    match tokio::time::timeout(Duration::from_millis(timeout_ms), self.storage.latest(block_id)).await {
                        Ok(latest) => latest.map_err(|e| format!("local storage: {e}")),
                        Err(_) => Err(format!("local storage did not answer within {timeout_ms} ms")),
                    }
                } else {
                    member_latest(network, peer, block_id, timeout_ms).await
                };
                let (reachable, latest, error) = match answer {
                    Ok(latest) => (true, latest, None),
                    Err(reason) => (false, None, Some(reason)),
                };
                MemberState { peer_id: peer.to_string(), multiaddrs, is_self: peer == me, reachable, latest, error }
            }
        });
        let members = futures::future::join_all(asks).await;
        Ok(Location {
            block_id: block_id.to_string(),
            seen_by: me.to_string(),
            cluster_size: self.key_network.cluster_size(),
            members,
        })
    }
}

/// Addresses without their `/p2p` suffix, each once, in their first order.
fn plain_addrs(addrs: &[String]) -> Vec<String> {
    let mut plain: Vec<String> = Vec::with_capacity(addrs.len());
    for text in addrs {
        let stripped = match text.parse::<Multiaddr>() {
            Ok(addr) => addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect::<Multiaddr>().to_string(),
            Err(_) => text.clone(),
        };
        if !plain.contains(&stripped) {
            plain.push(stripped);
        }
    }
    plain
}

/// A member's newest revision of a block, from a `get` in read mode `local`.
async fn member_latest(
    network: Arc<dyn PeerNetwork>,
    peer: PeerId,
    block_id: &BlockId,
    timeout_ms: u64,
) -> Result<Option<TrxRev>, String> {
    let client = RepoClient::new(network, peer).with_default_timeout_ms(timeout_ms);
    let gets = BlockGets { block_ids: vec![block_id.clone()], context: None, read_mode: Some(ReadMode::Local) };
    let options = MessageOptions::expiring_in(timeout_ms);
    match tokio::time::timeout(Duration::from_millis(timeout_ms), client.get(&gets, &options)).await {
        Ok(Ok(mut results)) => match results.remove(block_id) {
            Some(result) => Ok(result.state.latest),
            None => Err("its answer did not include the block".to_owned()),
        },
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout_ms} ms")),
    }
}

#[async_trait]
impl OperatorHandler for NodeOperator {
    async fn handle(&self, request: OperatorRequest, expiration_ms: u64) -> Result<Value, RepoError> {
        let encode = |e: serde_json::Error| RepoError::Internal(format!("cannot encode the answer: {e}"));
        match request {
            OperatorRequest::Status => serde_json::to_value(self.status().await).map_err(encode),
            OperatorRequest::Locate { block_id } => {
                serde_json::to_value(self.locate(&block_id, expiration_ms).await?).map_err(encode)
            }
        }
    }
}

/// Why an operator request sent to a node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    /// The request did not get an answer, or the node answered with an error.
    #[error(transparent)]
    Network(Box<NetworkError>),
    /// The answer is not of the expected shape.
    #[error("unexpected answer: {0}")]
    Answer(String),
}

/// Sends `request` to `peer` over `network` and returns the answer, within `timeout_ms`.
pub async fn ask(
    network: &dyn PeerNetwork,
    peer: PeerId,
    request: &OperatorRequest,
    timeout_ms: u64,
) -> Result<Value, OpsError> {
    let message = request.to_message(now_ms().saturating_add(timeout_ms));
    network
        .request(peer, ProtocolKind::Repo, message, Duration::from_millis(timeout_ms))
        .await
        .map_err(|e| OpsError::Network(Box::new(e)))
}

/// Reads an answer as `T`.
pub fn decode<T: serde::de::DeserializeOwned>(answer: Value) -> Result<T, OpsError> {
    serde_json::from_value(answer).map_err(|e| OpsError::Answer(e.to_string()))
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".to_owned();
    }
    map.iter().map(|(outcome, n)| format!("{outcome} {n}")).collect::<Vec<_>>().join(", ")
}

impl NodeStatus {
    /// The status as text, one `name  value` line each.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "peer id        {}", self.peer_id);
        for addr in &self.listen_addrs {
            let _ = writeln!(out, "listening      {addr}");
        }
        let _ = writeln!(out, "ready          {} ({})", if self.ready { "yes" } else { "no" }, self.ready_detail);
        let _ = writeln!(out, "connected      {}", plural(self.connected_peers.len(), "peer"));
        for peer in &self.connected_peers {
            let _ = writeln!(out, "               {peer}");
        }
        let _ = writeln!(out, "routing table  {}", plural(self.routing_table_peers, "peer"));
        let s = &self.storage;
        let blocks = match (s.blocks, &s.note) {
            (Some(n), _) => plural(usize::try_from(n).unwrap_or(usize::MAX), "block"),
            (None, Some(note)) => format!("blocks unknown: {note}"),
            (None, None) => "blocks unknown".to_owned(),
        };
        let durable = if s.durable { "durable" } else { "not durable" };
        let _ = writeln!(out, "storage        {} ({durable}), {blocks}", s.kind);
        let _ =
            writeln!(out, "key network    {}, clusters of {}", self.key_network.kind, self.key_network.cluster_size);
        let _ = writeln!(
            out,
            "consensus      {}, rounds coordinated: {}",
            self.consensus.kind,
            counts(&self.consensus.rounds)
        );
        if self.operations.is_empty() {
            let _ = writeln!(out, "operations     none");
        }
        for (i, (op, outcomes)) in self.operations.iter().enumerate() {
            let label = if i == 0 { "operations" } else { "" };
            let _ = writeln!(out, "{label:<15}{op}: {}", counts(outcomes));
        }
        out
    }
}

impl Location {
    /// The location as text: a heading, then one line per member, closest first.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "block {}: cluster of {} (target {}) as {} sees it, closest first",
            self.block_id,
            self.members.len(),
            self.cluster_size,
            self.seen_by
        );
        for member in &self.members {
            let who = if member.is_self { " (this node)" } else { "" };
            let state = match (&member.latest, &member.error) {
                (_, Some(error)) => format!("unreachable: {error}"),
                (Some(latest), None) => {
                    format!("latest rev {} (trx {})", latest.rev, latest.trx_id)
                }
                (None, None) => "no revision".to_owned(),
            };
            let _ = writeln!(out, "  {}{who}: {state}", member.peer_id);
            for addr in &member.multiaddrs {
                let _ = writeln!(out, "      {addr}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    fn code(value: &Value) -> &str {
        value["error"]["code"].as_str().unwrap_or("")
    }

    #[derive(Debug)]
    struct Echo;

    #[async_trait]
    impl OperatorHandler for Echo {
        async fn handle(&self, request: OperatorRequest, _expiration_ms: u64) -> Result<Value, RepoError> {
            Ok(json!(format!("{request:?}")))
        }
    }

    #[test]
    fn requests_round_trip_and_malformed_ones_say_what_is_wrong() {
        let later = now_ms() + 10_000;
        let locate = OperatorRequest::Locate { block_id: BlockId::new("b1").unwrap() };
        for request in [OperatorRequest::Status, locate] {
            let message = request.to_message(later);
            assert!(OperatorRequest::is_operator_request(&message));
            assert_eq!(OperatorRequest::parse(&message), Ok((request, later)));
        }
        assert!(!OperatorRequest::is_operator_request(&json!({"operations": [], "expiration": later})));
        assert!(!OperatorRequest::is_operator_request(&json!(["node"])));
        for (bad, says) in [
            (json!({"node": {"op": "status"}}), "expiration"),
            (json!({"node": {"op": "status"}, "expiration": -1}), "expiration"),
            (json!({"node": "status", "expiration": later}), "must be an object"),
            (json!({"node": {}, "expiration": later}), "op"),
            (json!({"node": {"op": "reboot"}, "expiration": later}), "unknown operator request \"reboot\""),
            (json!({"node": {"op": "status", "x": 1}, "expiration": later}), "unknown field \"x\""),
            (json!({"node": {"op": "locate"}, "expiration": later}), "blockId"),
            (json!({"node": {"op": "locate", "blockId": ""}, "expiration": later}), "blockId"),
            (json!({"node": {"op": "status"}, "operations": [], "expiration": later}), "unknown field \"operations\""),
        ] {
            let error = OperatorRequest::parse(&bad).unwrap_err();
            assert!(error.contains(says), "{bad} -> {error}");
        }
    }

    #[tokio::test]
    async fn serving_answers_errors_with_envelopes_and_bounds_requests_in_flight() {
        let later = now_ms() + 10_000;
        let slots = OperatorSlots::default();
        let peer = PeerId::random();
        let echo: Option<Arc<dyn OperatorHandler>> = Some(Arc::new(Echo));
        let status = OperatorRequest::Status.to_message(later);
        assert_eq!(serve(echo.clone(), &slots, peer, &status).await, json!("Status"));
        let bad = serve(echo.clone(), &slots, peer, &json!({"node": {"op": "frob"}, "expiration": later})).await;
        assert_eq!(code(&bad), "bad-request", "{bad}");
        let expired = serve(echo.clone(), &slots, peer, &OperatorRequest::Status.to_message(1)).await;
        assert_eq!(code(&expired), "expired");
        assert_eq!(code(&serve(None, &slots, peer, &status).await), "unavailable");
        let held: Vec<OperatorSlot<'_>> =
            (0..MAX_OPERATOR_REQUESTS_IN_FLIGHT).map(|_| slots.take(PeerId::random()).unwrap()).collect();
        assert_eq!(code(&serve(echo.clone(), &slots, peer, &status).await), "busy");
        drop(held);
        assert_eq!(serve(echo, &slots, peer, &status).await, json!("Status"), "served again once a slot is free");
    }

    /// Answers `status` at once; a `locate` waits until released (a stopped member it asks).
    #[derive(Debug, Default)]
    struct SlowLocate(tokio::sync::Notify);

    #[async_trait]
    impl OperatorHandler for SlowLocate {
        async fn handle(&self, request: OperatorRequest, _expiration_ms: u64) -> Result<Value, RepoError> {
            if let OperatorRequest::Locate { .. } = request {
                self.0.notified().await;
            }
            Ok(json!(format!("{request:?}")))
        }
    }

    /// Issue 21 finding 11 / SPEC 4.10: one peer's slow `locate` requests cannot take every
    /// operator slot; its own further requests are `busy`, other peers are still served.
    #[tokio::test]
    async fn one_peer_cannot_take_every_operator_slot() {
        let later = now_ms() + 10_000;
        let slots = Arc::new(OperatorSlots::default());
        let handler = Arc::new(SlowLocate::default());
        let greedy = PeerId::random();
        let locate = OperatorRequest::Locate { block_id: BlockId::new("b1").unwrap() }.to_message(later);
        let mut pending = Vec::new();
        for _ in 0..MAX_OPERATOR_REQUESTS_IN_FLIGHT {
            let (slots, handler, locate) = (slots.clone(), handler.clone(), locate.clone());
            let handler: Option<Arc<dyn OperatorHandler>> = Some(handler);
            pending.push(tokio::spawn(async move { serve(handler, &slots, greedy, &locate).await }));
        }
        // The first locate holds its slot; the others are answered at once (the timeout only
        // turns a regression, where they would all wait, into a failure).
        let mut answered = Vec::new();
        while answered.len() < MAX_OPERATOR_REQUESTS_IN_FLIGHT - 1 {
            let next = futures::future::select_all(pending);
            let (done, _, rest) = tokio::time::timeout(Duration::from_secs(10), next)
                .await
                .expect("a second request from one peer is answered busy at once");
            answered.push(done.unwrap());
            pending = rest;
        }
        assert!(answered.iter().all(|a| code(a) == "busy"), "{answered:?}");
        let status = OperatorRequest::Status.to_message(later);
        let dyn_handler: Option<Arc<dyn OperatorHandler>> = Some(handler.clone());
        assert_eq!(code(&serve(dyn_handler.clone(), &slots, greedy, &status).await), "busy");
        for _ in 0..MAX_OPERATOR_REQUESTS_IN_FLIGHT {
            let other = PeerId::random();
            assert_eq!(serve(dyn_handler.clone(), &slots, other, &status).await, json!("Status"));
        }
        handler.0.notify_waiters();
        let last = pending.pop().unwrap().await.unwrap();
        assert!(last.as_str().is_some_and(|s| s.starts_with("Locate")), "{last}");
    }

    #[test]
    fn text_renderings_name_every_figure() {
        let status = NodeStatus {
            peer_id: "12D3KooWA".into(),
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/4101/p2p/12D3KooWA".into()],
            connected_peers: vec!["12D3KooWB".into()],
            routing_table_peers: 1,
            ready: true,
            ready_detail: "1 peer connected, 1 in the routing table".into(),
            storage: StorageStatus {
                kind: "file".into(),
                durable: true,
                blocks: None,
                bytes: None,
                note: Some("uncounted".into()),
            },
            key_network: KeyNetworkStatus { kind: "kademlia".into(), cluster_size: 3 },
            consensus: ConsensusStatus {
                kind: "majority-2pc".into(),
                rounds: BTreeMap::from([("committed".into(), 2)]),
            },
            operations: BTreeMap::from([("commit".into(), BTreeMap::from([("ok".into(), 2)]))]),
        };
        let text = status.to_text();
        for line in [
            "peer id        12D3KooWA",
            "ready          yes (1 peer connected",
            "connected      1 peer\n",
            "routing table  1 peer\n",
            "storage        file (durable), blocks unknown: uncounted",
            "consensus      majority-2pc, rounds coordinated: committed 2",
            "operations     commit: ok 2",
        ] {
            assert!(text.contains(line), "{line:?} missing in\n{text}");
        }
        let location = Location {
            block_id: "b1".into(),
            seen_by: "12D3KooWA".into(),
            cluster_size: 3,
            members: vec![
                MemberState {
                    peer_id: "12D3KooWA".into(),
                    multiaddrs: vec![],
                    is_self: true,
                    reachable: true,
                    latest: Some(TrxRev { trx_id: optimystic_core::TrxId::new("t1").unwrap(), rev: 2 }),
                    error: None,
                },
                MemberState {
                    peer_id: "12D3KooWB".into(),
                    multiaddrs: vec!["/ip4/127.0.0.1/tcp/4102".into()],
                    is_self: false,
                    reachable: false,
                    latest: None,
                    error: Some("dial failed".into()),
                },
            ],
        };
        let text = location.to_text();
        assert!(text.contains("12D3KooWA (this node): latest rev 2 (trx t1)"), "{text}");
        assert!(text.contains("12D3KooWB: unreachable: dial failed"), "{text}");
        let value = serde_json::to_value(&location).unwrap();
        assert_eq!(value["members"][0]["self"], true);
        assert_eq!(value["members"][1]["latest"], Value::Null);
        assert_eq!(decode::<Location>(value).unwrap(), location);
    }
}

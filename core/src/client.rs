//! Clients over any [`PeerNetwork`]: [`RepoClient`] is the [`Repo`] of a remote node (SPEC 3.2)
//! and [`ClusterClient`] carries cluster records to members (SPEC 3.3).
//!
//! Both turn the peer's error envelope into the typed [`RepoError`] of its code, and every
//! transport failure into [`RepoError::Unavailable`] (the request may or may not have been
//! processed) or [`RepoError::Busy`] (nothing was sent).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use libp2p_identity::PeerId;
use serde_json::{Value, json};

use crate::error::RepoError;
use crate::model::{BlockGets, CommitRequest, CommitResult, GetBlockResults, PendRequest, PendResult, TrxBlocks};
use crate::network::{PeerNetwork, ProtocolKind};
use crate::record::ClusterRecord;
use crate::repo::{MessageOptions, Repo};
use crate::time::now_ms;
use crate::wire::{RepoMessage, RepoOperation, RepoResponse, decode_response};

/// How long a [`RepoClient`] call may take when its options carry no expiration.
pub const DEFAULT_CLIENT_TIMEOUT_MS: u64 = 30_000;

/// The repository of one remote peer, reached over the repo protocol.
///
/// Every call sends one message whose `expiration` is the options' expiration, or now plus the
/// client's default timeout when there is none, and waits for the answer until that expiration:
/// the network deadline is `expiration - now`. A call whose expiration has already passed fails
/// with [`RepoError::Expired`] without sending anything. A deadline that passes while waiting is
/// [`RepoError::Unavailable`]: the peer may still have applied the operation.
#[derive(Debug, Clone)]
pub struct RepoClient {
    network: Arc<dyn PeerNetwork>,
    peer: PeerId,
    default_timeout_ms: u64,
}

impl RepoClient {
    /// A client of `peer`'s repository over `network`, with [`DEFAULT_CLIENT_TIMEOUT_MS`].
    pub fn new(network: Arc<dyn PeerNetwork>, peer: PeerId) -> Self {
        Self { network, peer, default_timeout_ms: DEFAULT_CLIENT_TIMEOUT_MS }
    }

    /// The same client with another timeout for calls whose options carry no expiration.
    #[must_use]
    pub fn with_default_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.default_timeout_ms = timeout_ms;
        self
    }

    /// The peer this client talks to.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    async fn call(&self, operation: RepoOperation, options: &MessageOptions) -> Result<RepoResponse, RepoError> {
        let kind = operation.kind();
        let now = now_ms();
        let expiration = options.expiration_ms.unwrap_or_else(|| now.saturating_add(self.default_timeout_ms));
        let remaining_ms = match expiration.checked_sub(now) {
            Some(ms) if ms > 0 => ms,
            _ => return Err(RepoError::Expired),
        };
        let message = RepoMessage::new(operation, expiration);
        let request = serde_json::to_value(&message)
            .map_err(|e| RepoError::Internal(format!("cannot encode a {kind} message: {e}")))?;
        let response =
            self.network.request(self.peer, ProtocolKind::Repo, request, Duration::from_millis(remaining_ms)).await?;
        decode_response(kind, response)
    }
}

fn mismatch(kind: &str, got: &RepoResponse) -> RepoError {
    RepoError::Internal(format!("a {kind} request was answered with {got:?}"))
}

#[async_trait]
impl Repo for RepoClient {
    async fn get(&self, gets: &BlockGets, options: &MessageOptions) -> Result<GetBlockResults, RepoError> {
        match self.call(RepoOperation::Get(gets.clone()), options).await? {
            RepoResponse::Get(results) => Ok(results),
            other => Err(mismatch("get", &other)),
        }
    }

    async fn pend(&self, request: &PendRequest, options: &MessageOptions) -> Result<PendResult, RepoError> {
        match self.call(RepoOperation::Pend(request.clone()), options).await? {
            RepoResponse::Pend(result) => Ok(result),
            other => Err(mismatch("pend", &other)),
        }
    }

    async fn cancel(&self, trx: &TrxBlocks, options: &MessageOptions) -> Result<(), RepoError> {
        match self.call(RepoOperation::Cancel { trx_ref: trx.clone() }, options).await? {
            RepoResponse::Cancel => Ok(()),
            other => Err(mismatch("cancel", &other)),
        }
    }

    async fn commit(&self, request: &CommitRequest, options: &MessageOptions) -> Result<CommitResult, RepoError> {
        match self.call(RepoOperation::Commit(request.clone()), options).await? {
            RepoResponse::Commit(result) => Ok(result),
            other => Err(mismatch("commit", &other)),
        }
    }
}

/// The transport of the cluster protocol: sends a record to a member and returns the member's
/// merged copy. It neither verifies nor merges records; that is the consensus's job.
#[derive(Debug, Clone)]
pub struct ClusterClient {
    network: Arc<dyn PeerNetwork>,
}

impl ClusterClient {
    /// A client over `network`.
    pub fn new(network: Arc<dyn PeerNetwork>) -> Self {
        Self { network }
    }

    /// Sends `{"operation": "update", "record": record}` to `peer` and waits at most `timeout`.
    ///
    /// Returns the member's merged record as it sent it (unverified). Errors: the member's error
    /// envelope as its typed error (`bad-request` for a refused record, `expired`, ...);
    /// [`RepoError::Unavailable`] when the member could not be reached or did not answer in time
    /// (it may have processed the record); [`RepoError::Busy`] when too many requests are in
    /// flight (nothing was sent); [`RepoError::Internal`] when the answer is not a record.
    pub async fn update(
        &self,
        peer: PeerId,
        record: &ClusterRecord,
        timeout: Duration,
    ) -> Result<ClusterRecord, RepoError> {
        let request = json!({"operation": "update", "record": record.to_value()});
        let response: Value = self.network.request(peer, ProtocolKind::Cluster, request, timeout).await?;
        ClusterRecord::from_value(response)
            .map_err(|e| RepoError::Internal(format!("{peer} answered an update with no record: {e}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;
    use crate::model::{BlockGetResult, BlockId, BlockTrxState};
    use crate::network::NetworkError;

    /// Answers every request with a fixed value and records what it was sent.
    #[derive(Debug)]
    struct Canned {
        local: PeerId,
        answer: Result<Value, NetworkError>,
        sent: Mutex<Vec<(ProtocolKind, Value, Duration)>>,
    }

    #[async_trait]
    impl PeerNetwork for Canned {
        fn local_peer_id(&self) -> PeerId {
            self.local
        }

        async fn request(
            &self,
            _peer: PeerId,
            protocol: ProtocolKind,
            request: Value,
            timeout: Duration,
        ) -> Result<Value, NetworkError> {
            self.sent.lock().unwrap().push((protocol, request, timeout));
            self.answer.clone()
        }
    }

    fn canned(answer: Result<Value, NetworkError>) -> Arc<Canned> {
        Arc::new(Canned { local: PeerId::random(), answer, sent: Mutex::new(Vec::new()) })
    }

    fn gets() -> BlockGets {
        BlockGets { block_ids: vec![BlockId::new("a").unwrap()], context: None, read_mode: None }
    }

    #[tokio::test]
    async fn get_sends_one_message_with_the_expiration_and_a_matching_deadline() {
        let mut results = GetBlockResults::new();
        results.insert(
            BlockId::new("a").unwrap(),
            BlockGetResult { block: None, state: BlockTrxState { latest: None, pendings: vec![] } },
        );
        let network = canned(Ok(serde_json::to_value(&results).unwrap()));
        let client = RepoClient::new(network.clone(), PeerId::random());
        let expiration = now_ms() + 5_000;
        let got = client.get(&gets(), &MessageOptions { expiration_ms: Some(expiration) }).await.unwrap();
        assert_eq!(got, results);
        let sent = network.sent.lock().unwrap();
        let (protocol, request, timeout) = &sent[0];
        assert_eq!(*protocol, ProtocolKind::Repo);
        assert_eq!(request["expiration"], expiration);
        assert_eq!(request["operations"][0]["get"]["blockIds"][0], "a");
        assert!(*timeout <= Duration::from_millis(5_000) && *timeout > Duration::from_millis(4_000), "{timeout:?}");
    }

    #[tokio::test]
    async fn expired_options_fail_without_sending() {
        let network = canned(Ok(Value::Null));
        let client = RepoClient::new(network.clone(), PeerId::random());
        let err = client.get(&gets(), &MessageOptions { expiration_ms: Some(1) }).await.unwrap_err();
        assert!(matches!(err, RepoError::Expired));
        assert!(network.sent.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn envelopes_and_transport_failures_become_typed_errors() {
        let peer = PeerId::random();
        let remote = canned(Err(NetworkError::Remote { peer, code: "bad-request".into(), message: "no".into() }));
        let err = RepoClient::new(remote, peer).get(&gets(), &MessageOptions::default()).await.unwrap_err();
        assert!(matches!(err, RepoError::BadRequest(ref m) if m == "no"), "{err}");

        let timeout = canned(Err(NetworkError::Timeout { peer, timeout_ms: 5 }));
        let err = RepoClient::new(timeout, peer).get(&gets(), &MessageOptions::default()).await.unwrap_err();
        assert!(matches!(err, RepoError::Unavailable(_)), "{err}");

        let busy = canned(Err(NetworkError::Busy { limit: 1 }));
        let err = RepoClient::new(busy, peer).get(&gets(), &MessageOptions::default()).await.unwrap_err();
        assert!(matches!(err, RepoError::Busy(_)), "{err}");

        let malformed = canned(Ok(serde_json::json!({"a": 5})));
        let err = RepoClient::new(malformed, peer).get(&gets(), &MessageOptions::default()).await.unwrap_err();
        assert!(matches!(err, RepoError::Internal(_)), "{err}");
    }

    #[tokio::test]
    async fn cancel_answers_null_and_cluster_update_requires_a_record() {
        let peer = PeerId::random();
        let network = canned(Ok(Value::Null));
        let trx =
            TrxBlocks { trx_id: crate::model::TrxId::new("t").unwrap(), block_ids: vec![BlockId::new("a").unwrap()] };
        RepoClient::new(network.clone(), peer).cancel(&trx, &MessageOptions::default()).await.unwrap();
        assert_eq!(network.sent.lock().unwrap()[0].1["operations"][0]["cancel"]["trxRef"]["trxId"], "t");

        let record = ClusterRecord::new(BTreeMap::new(), serde_json::json!({"operations": [], "expiration": 1}));
        let echo = canned(Ok(record.to_value()));
        let merged = ClusterClient::new(echo.clone()).update(peer, &record, Duration::from_secs(1)).await.unwrap();
        assert_eq!(merged, record);
        let (kind, first, _) = echo.sent.lock().unwrap()[0].clone();
        assert_eq!(kind, ProtocolKind::Cluster);
        assert_eq!(first["operation"], "update");

        let err = ClusterClient::new(network).update(peer, &record, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, RepoError::Internal(_)), "{err}");
    }
}

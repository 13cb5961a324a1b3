//! Inbound request handling: [`RepoService`], [`ClusterService`] and [`SyncService`] turn one
//! request frame into one response value, and [`Services`] bounds how many run at once per
//! protocol.
//!
//! Every failure is answered with the SPEC 3.2 error envelope `{"error": {"code", "message"}}`:
//! malformed frames (bad prefix, oversize, truncated, not UTF-8, not JSON), unknown operations and
//! invalid transforms are `bad-request`, expired messages `expired`, requests past the in-flight
//! bound `busy`, a missing handler `unavailable`, a handler panic `internal`. A refused request
//! never reaches storage, so it changes nothing.
//!
//! On the repo protocol, a request with `node` in place of `operations` is an operator request
//! ([`crate::ops`]) and goes to the [`OperatorHandler`] instead of the repository.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use async_trait::async_trait;
use futures::FutureExt;
use optimystic_core::consensus::Consensus;
use optimystic_core::identity::PeerId;
use optimystic_core::network::ProtocolKind;
use optimystic_core::time::now_ms;
use optimystic_core::wire::{RepoMessage, RepoOperation, RepoResponse};
use optimystic_core::{ErrorCode, MessageOptions, Repo, RepoError};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::codec::Frame;
use crate::ops::{self, OperatorHandler, OperatorRequest, OperatorSlots};

/// Default bound on inbound requests being handled at once, per protocol (SPEC 3.1).
pub const DEFAULT_MAX_INBOUND_PER_PROTOCOL: usize = 32;
/// Default bound on inbound requests waiting for a handling slot, per protocol. A consensus round
/// sends every cluster member one request per coordinator in flight, so a burst easily passes the
/// in-flight bound; waiting briefly is cheaper for everyone than a `busy` answer and a retry.
pub const DEFAULT_MAX_QUEUED_INBOUND_PER_PROTOCOL: usize = 256;

/// The error envelope `{"error": {"code", "message"}}` as a JSON value.
pub fn envelope(code: ErrorCode, message: impl Into<String>) -> Value {
    json!({"error": {"code": code.as_str(), "message": message.into()}})
}

/// The error envelope of a [`RepoError`], with its wire code.
pub fn error_value(error: &RepoError) -> Value {
    envelope(error.code(), error.to_string())
}

/// Handles inbound requests of the sync protocol (`<prefix>/sync/1.0.0`).
///
/// The transport only frames and routes: the request is any JSON value, the answer any JSON value
/// or an error, which is sent as the error envelope of its code.
#[async_trait]
pub trait SyncHandler: Send + Sync + std::fmt::Debug + 'static {
    /// Answers one sync request from `sender` (as the transport authenticated it: work a
    /// request causes, such as a hint's catch-ups, is bounded per sender). Must not block the
    /// executor; may take as long as the host's request timeout allows (the requester gives up
    /// after that).
    async fn handle(&self, sender: PeerId, request: Value) -> Result<Value, RepoError>;
}

/// What a node serves on each protocol. A protocol without a handler answers `unavailable`.
#[derive(Clone, Default)]
pub struct Handlers {
    /// Serves `<prefix>/repo/1.0.0`.
    pub repo: Option<Arc<dyn Repo>>,
    /// Serves `<prefix>/cluster/1.0.0` (`Consensus::on_update`).
    pub cluster: Option<Arc<dyn Consensus>>,
    /// Serves `<prefix>/sync/1.0.0`.
    pub sync: Option<Arc<dyn SyncHandler>>,
    /// Serves operator requests on the repo protocol ([`crate::ops`]).
    pub operator: Option<Arc<dyn OperatorHandler>>,
}

impl Handlers {
    /// Handlers serving the repo protocol only.
    pub fn repo(repo: Arc<dyn Repo>) -> Self {
        Self { repo: Some(repo), ..Self::default() }
    }

    /// These handlers, also serving the cluster protocol.
    #[must_use]
    pub fn with_cluster(mut self, consensus: Arc<dyn Consensus>) -> Self {
        self.cluster = Some(consensus);
        self
    }

    /// These handlers, also serving the sync protocol.
    #[must_use]
    pub fn with_sync(mut self, sync: Arc<dyn SyncHandler>) -> Self {
        self.sync = Some(sync);
        self
    }

    /// These handlers, also serving operator requests.
    #[must_use]
    pub fn with_operator(mut self, operator: Arc<dyn OperatorHandler>) -> Self {
        self.operator = Some(operator);
        self
    }
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handlers")
            .field("repo", &self.repo.is_some())
            .field("cluster", &self.cluster)
            .field("sync", &self.sync)
            .field("operator", &self.operator)
            .finish()
    }
}

/// The repo protocol (SPEC 3.2): one [`RepoMessage`] in, the operation's result or an error
/// envelope out.
#[derive(Clone)]
pub struct RepoService {
    repo: Arc<dyn Repo>,
}

impl std::fmt::Debug for RepoService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoService").finish_non_exhaustive()
    }
}

impl RepoService {
    /// A service over a repository.
    pub fn new(repo: Arc<dyn Repo>) -> Self {
        Self { repo }
    }

    /// Answers one request frame. Malformed frames and messages (not exactly one known operation,
    /// invalid ids, missing `expiration`) are `bad-request` and an expired message is `expired`,
    /// all without calling the repository. The repository receives the message's expiration in
    /// its [`MessageOptions`].
    pub async fn serve(&self, frame: Frame) -> Value {
        let value = match frame.into_json() {
            Ok(value) => value,
            Err(e) => return envelope(ErrorCode::BadRequest, e.to_string()),
        };
        let message = match RepoMessage::from_value(value) {
            Ok(message) => message,
            Err(e) => return envelope(ErrorCode::BadRequest, e.to_string()),
        };
        if message.is_expired(now_ms()) {
            return envelope(ErrorCode::Expired, format!("message expired at {} ms", message.expiration));
        }
        let options = MessageOptions { expiration_ms: Some(message.expiration) };
        let operation = match message.into_operation() {
            Ok(operation) => operation,
            Err(e) => return envelope(ErrorCode::BadRequest, e.to_string()),
        };
        let result = match operation {
            RepoOperation::Get(gets) => self.repo.get(&gets, &options).await.map(RepoResponse::Get),
            RepoOperation::Pend(request) => self.repo.pend(&request, &options).await.map(RepoResponse::Pend),
            RepoOperation::Cancel { trx_ref } => {
                self.repo.cancel(&trx_ref, &options).await.map(|()| RepoResponse::Cancel)
            }
            RepoOperation::Commit(request) => self.repo.commit(&request, &options).await.map(RepoResponse::Commit),
        };
        match result {
            Ok(response) => response
                .to_value()
                .unwrap_or_else(|e| envelope(ErrorCode::Internal, format!("cannot encode the response: {e}"))),
            Err(e) => error_value(&e),
        }
    }
}

/// The cluster protocol (SPEC 3.3): `{"operation": "update", "record": ClusterRecord}` in, the
/// member's merged record or an error envelope out.
#[derive(Clone, Debug)]
pub struct ClusterService {
    consensus: Arc<dyn Consensus>,
}

impl ClusterService {
    /// A service over a consensus member.
    pub fn new(consensus: Arc<dyn Consensus>) -> Self {
        Self { consensus }
    }

    /// Answers one request frame from `sender` (as the transport authenticated it) through
    /// [`Consensus::handle_request`] (`update`, and whatever other operations the consensus
    /// defines, such as recovery `status` queries). A malformed frame is `bad-request` without
    /// calling the consensus; parsing and verifying records (hashes, signatures, expiry) is the
    /// consensus's job.
    pub async fn serve(&self, sender: PeerId, frame: Frame) -> Value {
        let value = match frame.into_json() {
            Ok(value) => value,
            Err(e) => return envelope(ErrorCode::BadRequest, e.to_string()),
        };
        match self.consensus.handle_request(sender, value).await {
            Ok(answer) => answer,
            Err(e) => error_value(&e),
        }
    }
}

/// The sync protocol: any JSON request to a [`SyncHandler`].
#[derive(Clone, Debug)]
pub struct SyncService {
    handler: Arc<dyn SyncHandler>,
}

impl SyncService {
    /// A service over a sync handler.
    pub fn new(handler: Arc<dyn SyncHandler>) -> Self {
        Self { handler }
    }

    /// Answers one request frame from `sender`; malformed frames are `bad-request`.
    pub async fn serve(&self, sender: PeerId, frame: Frame) -> Value {
        match frame.into_json() {
            Ok(value) => match self.handler.handle(sender, value).await {
                Ok(answer) => answer,
                Err(e) => error_value(&e),
            },
            Err(e) => envelope(ErrorCode::BadRequest, e.to_string()),
        }
    }
}

/// One value per protocol.
#[derive(Clone, Debug, Default)]
pub(crate) struct PerProtocol<T> {
    pub(crate) repo: T,
    pub(crate) cluster: T,
    pub(crate) sync: T,
}

impl<T> PerProtocol<T> {
    pub(crate) fn from_fn(mut f: impl FnMut(ProtocolKind) -> T) -> Self {
        Self { repo: f(ProtocolKind::Repo), cluster: f(ProtocolKind::Cluster), sync: f(ProtocolKind::Sync) }
    }

    pub(crate) fn get(&self, kind: ProtocolKind) -> &T {
        match kind {
            ProtocolKind::Repo => &self.repo,
            ProtocolKind::Cluster => &self.cluster,
            ProtocolKind::Sync => &self.sync,
        }
    }
}

/// The inbound side of a node: the current [`Handlers`], a bound of requests in flight per
/// protocol and a bounded queue of requests waiting for a slot.
///
/// Handlers can be set or replaced at any time ([`Services::set_handlers`]): a request is served by
/// the handlers current when it starts.
#[derive(Debug)]
pub struct Services {
    handlers: RwLock<Handlers>,
    inbound: PerProtocol<Arc<Semaphore>>,
    queued: PerProtocol<Arc<AtomicUsize>>,
    max_inbound_per_protocol: usize,
    max_queued_inbound_per_protocol: usize,
    operator_slots: Arc<OperatorSlots>,
}

/// An admitted request: it holds a handling slot, or a place in the queue for one.
#[derive(Debug)]
pub struct Admission {
    semaphore: Arc<Semaphore>,
    state: AdmissionState,
}

#[derive(Debug)]
enum AdmissionState {
    Ready(OwnedSemaphorePermit),
    Queued(QueueSlot),
}

/// A place in a protocol's queue, given back when dropped.
#[derive(Debug)]
struct QueueSlot(Arc<AtomicUsize>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// Whether the request waits in the queue.
    pub fn is_queued(&self) -> bool {
        matches!(self.state, AdmissionState::Queued(_))
    }

    /// The handling slot: at once, or when a request ahead of this one finishes (first come,
    /// first served). Hold it until the answer is handed back.
    pub async fn ready(self) -> Result<OwnedSemaphorePermit, Value> {
        match self.state {
            AdmissionState::Ready(permit) => Ok(permit),
            AdmissionState::Queued(slot) => {
                let permit = self.semaphore.acquire_owned().await;
                drop(slot);
                permit.map_err(|_| envelope(ErrorCode::Unavailable, "the node is shutting down"))
            }
        }
    }
}

impl Services {
    /// Services with no handlers yet, admitting at most `max_inbound_per_protocol` requests at once
    /// per protocol (at least one) and queueing at most `max_queued_inbound_per_protocol` more.
    pub fn new(max_inbound_per_protocol: usize, max_queued_inbound_per_protocol: usize) -> Self {
        let limit = max_inbound_per_protocol.max(1);
        Self {
            handlers: RwLock::new(Handlers::default()),
            inbound: PerProtocol::from_fn(|_| Arc::new(Semaphore::new(limit))),
            queued: PerProtocol::from_fn(|_| Arc::new(AtomicUsize::new(0))),
            max_inbound_per_protocol: limit,
            max_queued_inbound_per_protocol,
            operator_slots: Arc::new(OperatorSlots::default()),
        }
    }

    /// Installs the handlers used for requests that start from now on.
    pub fn set_handlers(&self, handlers: Handlers) {
        *self.handlers.write().unwrap_or_else(PoisonError::into_inner) = handlers;
    }

    /// The current handlers.
    pub fn handlers(&self) -> Handlers {
        self.handlers.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Admits one request on `kind`: a handling slot, a place in the queue for one, or the `busy`
    /// envelope to answer right away when both the slots and the queue are full.
    pub fn admit(&self, kind: ProtocolKind) -> Result<Admission, Value> {
        let semaphore = Arc::clone(self.inbound.get(kind));
        if let Ok(permit) = Arc::clone(&semaphore).try_acquire_owned() {
            return Ok(Admission { semaphore, state: AdmissionState::Ready(permit) });
        }
        let queued = self.queued.get(kind);
        let claimed = queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < self.max_queued_inbound_per_protocol).then_some(n + 1)
        });
        match claimed {
            Ok(_) => Ok(Admission { semaphore, state: AdmissionState::Queued(QueueSlot(Arc::clone(queued))) }),
            Err(_) => Err(envelope(
                ErrorCode::Busy,
                format!(
                    "{} requests in flight and {} queued on the {} protocol; retry later",
                    self.max_inbound_per_protocol,
                    self.max_queued_inbound_per_protocol,
                    kind.name()
                ),
            )),
        }
    }

    /// Answers one request on `kind` with the current handlers. A handler that panics is answered
    /// `internal`; the node goes on serving.
    pub async fn serve(&self, kind: ProtocolKind, sender: PeerId, frame: Frame) -> Value {
        let handlers = self.handlers();
        let operator_slots = Arc::clone(&self.operator_slots);
        let work = async move {
            match kind {
                ProtocolKind::Repo => match frame {
                    Frame::Json(value) if OperatorRequest::is_operator_request(&value) => {
                        ops::serve(handlers.operator, &operator_slots, sender, &value).await
                    }
                    frame => match handlers.repo {
                        Some(repo) => RepoService::new(repo).serve(frame).await,
                        None => not_served(kind),
                    },
                },
                ProtocolKind::Cluster => match handlers.cluster {
                    Some(consensus) => ClusterService::new(consensus).serve(sender, frame).await,
                    None => not_served(kind),
                },
                ProtocolKind::Sync => match handlers.sync {
                    Some(sync) => SyncService::new(sync).serve(sender, frame).await,
                    None => not_served(kind),
                },
            }
        };
        match AssertUnwindSafe(work).catch_unwind().await {
            Ok(value) => value,
            Err(_) => {
                tracing::error!(protocol = kind.name(), "request handler panicked");
                envelope(ErrorCode::Internal, "the request handler failed")
            }
        }
    }

    /// Requests in flight per protocol, by protocol name (for metrics).
    pub fn in_flight(&self) -> BTreeMap<&'static str, usize> {
        ProtocolKind::ALL
            .iter()
            .map(|&kind| {
                let free = self.inbound.get(kind).available_permits();
                (kind.name(), self.max_inbound_per_protocol.saturating_sub(free))
            })
            .collect()
    }

    /// Requests waiting for a handling slot per protocol, by protocol name (for metrics).
    pub fn queued(&self) -> BTreeMap<&'static str, usize> {
        ProtocolKind::ALL.iter().map(|&kind| (kind.name(), self.queued.get(kind).load(Ordering::Acquire))).collect()
    }
}

fn not_served(kind: ProtocolKind) -> Value {
    envelope(ErrorCode::Unavailable, format!("this node does not serve the {} protocol (yet)", kind.name()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use optimystic_core::StorageRepo;
    use optimystic_core::record::ClusterRecord;
    use optimystic_storage_memory::MemoryStorage;

    use super::*;
    use crate::codec::FrameError;

    fn repo_service() -> RepoService {
        RepoService::new(Arc::new(StorageRepo::new(Arc::new(MemoryStorage::new()))))
    }

    fn code(value: &Value) -> &str {
        value["error"]["code"].as_str().unwrap_or("")
    }

    fn later() -> u64 {
        now_ms() + 60_000
    }

    #[tokio::test]
    async fn repo_service_answers_bad_requests_with_envelopes() {
        let service = repo_service();
        let malformed = service.serve(Frame::Malformed(FrameError::NotJson("x".into()))).await;
        assert_eq!(code(&malformed), "bad-request");
        let unknown = service.serve(Frame::Json(json!({"operations": [{"frob": {}}], "expiration": later()}))).await;
        assert_eq!(code(&unknown), "bad-request");
        let two = service
            .serve(Frame::Json(json!({"operations": [{"get": {"blockIds": ["a"]}}, {"get": {"blockIds": ["b"]}}], "expiration": later()})))
            .await;
        assert_eq!(code(&two), "bad-request");
        let expired =
            service.serve(Frame::Json(json!({"operations": [{"get": {"blockIds": ["a"]}}], "expiration": 1}))).await;
        assert_eq!(code(&expired), "expired");
        let invalid = service
            .serve(Frame::Json(json!({"operations": [{"pend": {"trxId": "t1", "transforms": {"inserts": {"a": {"header": {"id": "b", "type": "t", "collectionId": "c"}}}, "updates": {}, "deletes": []}, "policy": "c"}}], "expiration": later()})))
            .await;
        assert_eq!(code(&invalid), "bad-request", "{invalid}");
        let ok = service
            .serve(Frame::Json(json!({"operations": [{"get": {"blockIds": ["a"]}}], "expiration": later()})))
            .await;
        assert!(ok["a"]["state"].is_object(), "{ok}");
    }

    #[tokio::test]
    async fn services_bound_requests_in_flight_and_queued_and_report_missing_handlers() {
        let services = Services::new(2, 1);
        let unserved = services.serve(ProtocolKind::Cluster, PeerId::random(), Frame::Json(json!({}))).await;
        assert_eq!(code(&unserved), "unavailable");
        let a = services.admit(ProtocolKind::Repo).unwrap().ready().await.unwrap();
        let _b = services.admit(ProtocolKind::Repo).unwrap().ready().await.unwrap();
        let queued = services.admit(ProtocolKind::Repo).unwrap();
        assert!(queued.is_queued());
        assert_eq!(services.queued()["repo"], 1);
        let busy = services.admit(ProtocolKind::Repo).unwrap_err();
        assert_eq!(code(&busy), "busy");
        assert!(services.admit(ProtocolKind::Sync).is_ok(), "limits are per protocol");
        assert_eq!(services.in_flight()["repo"], 2);
        let waiting = tokio::spawn(queued.ready());
        drop(a);
        let _c = waiting.await.unwrap().unwrap();
        assert_eq!(services.queued()["repo"], 0, "the queued request took the freed slot");
        assert_eq!(services.in_flight()["repo"], 2);
        let queued_again = services.admit(ProtocolKind::Repo).unwrap();
        assert!(queued_again.is_queued(), "the queue place was given back");
    }

    #[tokio::test]
    async fn operator_requests_on_the_repo_protocol_go_to_the_operator_handler() {
        #[derive(Debug)]
        struct Answer;
        #[async_trait]
        impl OperatorHandler for Answer {
            async fn handle(&self, _request: OperatorRequest, _expiration_ms: u64) -> Result<Value, RepoError> {
                Ok(json!("operator"))
            }
        }
        let services = Services::new(4, 0);
        let peer = PeerId::random();
        let status = Frame::Json(OperatorRequest::Status.to_message(later()));
        assert_eq!(code(&services.serve(ProtocolKind::Repo, peer, status.clone()).await), "unavailable");
        services.set_handlers(Handlers::repo(repo_service().repo).with_operator(Arc::new(Answer)));
        assert_eq!(services.serve(ProtocolKind::Repo, peer, status).await, json!("operator"));
        let malformed = Frame::Json(json!({"node": {"op": "frob"}, "expiration": later()}));
        let refused = services.serve(ProtocolKind::Repo, peer, malformed).await;
        assert_eq!(code(&refused), "bad-request");
        assert!(refused["error"]["message"].as_str().unwrap().contains("unknown operator request"), "{refused}");
        let get = Frame::Json(json!({"operations": [{"get": {"blockIds": ["a"]}}], "expiration": later()}));
        let answer = services.serve(ProtocolKind::Repo, peer, get).await;
        assert!(answer["a"]["state"].is_object(), "repo requests are still served: {answer}");
    }

    #[derive(Debug)]
    struct Panicking;

    #[async_trait]
    impl SyncHandler for Panicking {
        async fn handle(&self, _sender: PeerId, _request: Value) -> Result<Value, RepoError> {
            panic!("handler bug")
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_internal() {
        let services = Services::new(1, 0);
        services.set_handlers(Handlers::default().with_sync(Arc::new(Panicking)));
        let answer = services.serve(ProtocolKind::Sync, PeerId::random(), Frame::Json(json!(1))).await;
        assert_eq!(code(&answer), "internal");
    }

    #[tokio::test]
    async fn cluster_service_refuses_unknown_operations_and_bad_records() {
        #[derive(Debug)]
        struct Refuse;
        #[async_trait]
        impl Consensus for Refuse {
            async fn execute(
                &self,
                _peers: &optimystic_core::keynet::ClusterPeers,
                _message: &RepoMessage,
            ) -> Result<RepoResponse, RepoError> {
                Err(RepoError::Internal("unused".into()))
            }
            async fn on_update(&self, _sender: PeerId, _record: ClusterRecord) -> Result<ClusterRecord, RepoError> {
                Err(RepoError::Expired)
            }
        }
        let service = ClusterService::new(Arc::new(Refuse));
        let peer = PeerId::random();
        assert_eq!(code(&service.serve(peer, Frame::Json(json!([]))).await), "bad-request");
        assert_eq!(code(&service.serve(peer, Frame::Json(json!({"operation": "delete"}))).await), "bad-request");
        assert_eq!(code(&service.serve(peer, Frame::Json(json!({"operation": "update"}))).await), "bad-request");
        assert_eq!(
            code(&service.serve(peer, Frame::Json(json!({"operation": "update", "record": 5}))).await),
            "bad-request"
        );
    }
}

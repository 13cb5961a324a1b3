//! The libp2p host over real TCP on 127.0.0.1: repo round trips, DHT clusters, malformed frames,
//! in-flight bounds and deadlines. Every wait is bounded; nothing sleeps to synchronize.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, noise, tcp, yamux};
use optimystic_core::client::RepoClient;
use optimystic_core::keynet::PeerRouting;
use optimystic_core::network::{NetworkError, PeerNetwork, ProtocolKind};
use optimystic_core::registry::{KeyNetworkContext, Registry};
use optimystic_core::time::now_ms;
use optimystic_core::{
    Block, BlockGets, BlockId, CommitRequest, CommitResult, GetBlockResults, MessageOptions, PendPolicy, PendRequest,
    PendResult, Repo, RepoError, StorageRepo, Transforms, TrxBlocks, TrxContext, TrxId,
};
use optimystic_node::codec::{DEFAULT_REPO_MAX_FRAME_BYTES, decode_frame, encode_varint};
use optimystic_node::{Handlers, Host, HostConfig, HostHandle, identity};
use optimystic_storage_memory::MemoryStorage;
// Linked so that `Registry::linked` sees their descriptors.
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};
use {optimystic_keynet_kademlia as _, optimystic_keynet_static as _};

/// Upper bound on any one test.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test).await.expect("test did not finish in time")
}

fn loopback() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().unwrap()
}

async fn start(config: impl FnOnce(&mut HostConfig), handlers: Handlers) -> HostHandle {
    let mut host_config = HostConfig::new(identity::generate());
    host_config.listen = vec![loopback()];
    config(&mut host_config);
    Host::start(host_config, handlers).await.unwrap()
}

fn memory_repo() -> Arc<dyn Repo> {
    Arc::new(StorageRepo::new(Arc::new(MemoryStorage::new())))
}

/// A host that serves nothing and dials `server`.
async fn client_of(server: &HostHandle, config: impl FnOnce(&mut HostConfig)) -> HostHandle {
    let client = start(
        |c| {
            c.listen.clear();
            config(c);
        },
        Handlers::default(),
    )
    .await;
    client.add_address(server.local_peer_id(), server.listen_addrs()[0].clone()).await.unwrap();
    client
}

fn id(text: &str) -> BlockId {
    BlockId::new(text).unwrap()
}

fn trx(text: &str) -> TrxId {
    TrxId::new(text).unwrap()
}

fn soon() -> MessageOptions {
    MessageOptions::expiring_in(10_000)
}

fn insert(block: &str) -> Transforms {
    let mut transforms = Transforms::default();
    transforms.inserts.insert(id(block), Block::new(id(block), "note", "c1").with_field("text", json!("hello")));
    transforms
}

async fn get(repo: &dyn Repo, block: &str, context: Option<TrxContext>) -> GetBlockResults {
    repo.get(&BlockGets { block_ids: vec![id(block)], context, read_mode: None }, &soon()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repo_client_round_trips_get_pend_commit_cancel_and_stale() {
    bounded(async {
        let server = start(|_| {}, Handlers::repo(memory_repo())).await;
        let client_host = client_of(&server, |_| {}).await;
        let client = RepoClient::new(Arc::new(client_host.clone()), server.local_peer_id());

        let unknown = get(&client, "b1", None).await;
        assert!(unknown[&id("b1")].block.is_none());
        assert!(unknown[&id("b1")].state.latest.is_none());

        let pend =
            PendRequest { trx_id: trx("t1"), rev: Some(1), transforms: insert("b1"), policy: PendPolicy::Continue };
        assert!(matches!(client.pend(&pend, &soon()).await.unwrap(), PendResult::Success(_)));
        let own = get(&client, "b1", Some(TrxContext { committed: vec![], rev: 0, trx_id: Some(trx("t1")) })).await;
        assert_eq!(own[&id("b1")].block.as_ref().unwrap().fields["text"], "hello");
        assert_eq!(own[&id("b1")].state.pendings, vec![trx("t1")]);

        let commit =
            CommitRequest { trx_id: trx("t1"), block_ids: vec![id("b1")], rev: 1, tail_id: id("b1"), header_id: None };
        assert!(client.commit(&commit, &soon()).await.unwrap().is_success());
        let committed = get(&client, "b1", None).await;
        assert_eq!(committed[&id("b1")].state.latest.as_ref().map(|l| l.rev), Some(1));
        assert!(committed[&id("b1")].block.is_some());

        let mut update = Transforms::default();
        update.updates.insert(id("b1"), vec![optimystic_core::BlockOperation::set("text", json!("bye"))]);
        let pend2 = PendRequest { trx_id: trx("t2"), rev: Some(2), transforms: update, policy: PendPolicy::Fail };
        assert!(matches!(client.pend(&pend2, &soon()).await.unwrap(), PendResult::Success(_)));
        assert_eq!(get(&client, "b1", None).await[&id("b1")].state.pendings, vec![trx("t2")]);
        client.cancel(&TrxBlocks { trx_id: trx("t2"), block_ids: vec![id("b1")] }, &soon()).await.unwrap();
        assert!(get(&client, "b1", None).await[&id("b1")].state.pendings.is_empty());

        // A writer that did not see t1 is stale: the answer lists what it missed.
        let stale =
            PendRequest { trx_id: trx("t3"), rev: Some(1), transforms: insert("b1"), policy: PendPolicy::Continue };
        match client.pend(&stale, &soon()).await.unwrap() {
            PendResult::Stale(failure) => {
                let missing = failure.missing.unwrap();
                assert_eq!(missing.len(), 1);
                assert_eq!(missing[0].trx_id, trx("t1"));
            }
            other => panic!("expected a stale failure, got {other:?}"),
        }
        let stale_commit =
            CommitRequest { trx_id: trx("t9"), block_ids: vec![id("b1")], rev: 1, tail_id: id("b1"), header_id: None };
        assert!(matches!(client.commit(&stale_commit, &soon()).await.unwrap(), CommitResult::Stale(_)));

        // Error envelopes come back typed.
        let missing_trx =
            CommitRequest { trx_id: trx("t8"), block_ids: vec![id("b1")], rev: 5, tail_id: id("b1"), header_id: None };
        assert!(matches!(client.commit(&missing_trx, &soon()).await, Err(RepoError::BadRequest(_))));
        assert!(matches!(
            client
                .get(
                    &BlockGets { block_ids: vec![id("b1")], context: None, read_mode: None },
                    &MessageOptions { expiration_ms: Some(1) }
                )
                .await,
            Err(RepoError::Expired)
        ));

        client_host.shutdown().await;
        server.shutdown().await;
        assert!(matches!(
            client.get(&BlockGets { block_ids: vec![id("b1")], context: None, read_mode: None }, &soon()).await,
            Err(RepoError::Unavailable(_))
        ));
    })
    .await;
}

/// Waits until every host's routing table holds `n` peers, woken by routing updates.
async fn await_routing_tables(hosts: &[HostHandle], n: usize) {
    let mut updates: Vec<_> = hosts.iter().map(HostHandle::routing_updates).collect();
    loop {
        for rx in &mut updates {
            rx.borrow_and_update();
        }
        let mut settled = true;
        for host in hosts {
            settled &= host.known_peers().await.len() >= n;
        }
        if settled {
            return;
        }
        let changes = updates.iter_mut().map(|rx| Box::pin(rx.changed()));
        let (changed, _, _) = futures::future::select_all(changes).await;
        changed.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_agree_on_clusters_with_the_static_ranking() {
    bounded(async {
        let first = start(|_| {}, Handlers::repo(memory_repo())).await;
        let seed = first.p2p_addrs()[0].clone();
        let mut hosts = vec![first];
        for _ in 0..4 {
            let bootstrap = vec![seed.clone()];
            hosts.push(start(move |c| c.bootstrap = bootstrap, Handlers::repo(memory_repo())).await);
        }
        await_routing_tables(&hosts, 4).await;

        let registry = Registry::linked();
        let members: Vec<String> = hosts.iter().map(|h| h.local_peer_id().to_string()).collect();
        let mut kademlia = Vec::new();
        let mut fixed = Vec::new();
        for host in &hosts {
            let cx = KeyNetworkContext {
                local_peer_id: host.local_peer_id(),
                routing: Arc::new(host.clone()) as Arc<dyn PeerRouting>,
            };
            kademlia.push(
                registry.build_key_network("kademlia", &cx, &json!({"kind": "kademlia", "cluster_size": 3})).unwrap(),
            );
            fixed.push(
                registry
                    .build_key_network("static", &cx, &json!({"kind": "static", "cluster_size": 3, "members": members}))
                    .unwrap(),
            );
        }
        for _ in 0..20 {
            let block = id(&format!("block-{:016x}", rand::random::<u64>()));
            let expected: BTreeSet<PeerId> = fixed[0].find_cluster(&block).await.unwrap().into_keys().collect();
            assert_eq!(expected.len(), 3);
            for (k, s) in kademlia.iter().zip(&fixed) {
                let got: BTreeSet<PeerId> = k.find_cluster(&block).await.unwrap().into_keys().collect();
                assert_eq!(got, expected, "kademlia view differs for {block}");
                let static_view: BTreeSet<PeerId> = s.find_cluster(&block).await.unwrap().into_keys().collect();
                assert_eq!(static_view, expected);
                assert_eq!(
                    k.find_coordinator(&block, &[]).await.unwrap(),
                    s.find_coordinator(&block, &[]).await.unwrap()
                );
            }
        }
        let lookup = hosts[1].closest_peers(&id("anything")).await.unwrap();
        assert!(lookup.len() >= 3, "lookup found {lookup:?}");
        for host in &hosts {
            host.shutdown().await;
        }
    })
    .await;
}

/// Writes raw bytes on a repo stream and reads the raw answer, through a request-response
/// behaviour whose codec does no framing.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, _: &mut T) -> io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        Err(io::Error::other("the raw client serves nothing"))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let mut answer = Vec::new();
        io.take(1 << 20).read_to_end(&mut answer).await?;
        Ok(answer)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, bytes: Vec<u8>) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        io.write_all(&bytes).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, _: &mut T, _: Vec<u8>) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        Err(io::Error::other("the raw client serves nothing"))
    }
}

struct RawClient {
    swarm: libp2p::Swarm<request_response::Behaviour<RawCodec>>,
    server: PeerId,
}

impl RawClient {
    fn connect(server: &HostHandle) -> Self {
        let protocol = StreamProtocol::new("/db-p2p/repo/1.0.0");
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
            .unwrap()
            .with_behaviour(|_| {
                request_response::Behaviour::with_codec(
                    RawCodec,
                    [(protocol, ProtocolSupport::Outbound)],
                    request_response::Config::default().with_request_timeout(Duration::from_secs(20)),
                )
            })
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        swarm.add_peer_address(server.local_peer_id(), server.listen_addrs()[0].clone());
        Self { swarm, server: server.local_peer_id() }
    }

    /// Sends `bytes` as the whole request and returns the decoded response frame.
    async fn exchange(&mut self, bytes: Vec<u8>) -> Value {
        let id = self.swarm.behaviour_mut().send_request(&self.server, bytes);
        loop {
            match self.swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response },
                    ..
                }) if request_id == id => {
                    let (value, used) = decode_frame(&response, DEFAULT_REPO_MAX_FRAME_BYTES).unwrap().unwrap();
                    assert_eq!(used, response.len(), "one frame per response");
                    return value;
                }
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure { request_id, error, .. })
                    if request_id == id =>
                {
                    panic!("raw request failed: {error}")
                }
                _ => {}
            }
        }
    }
}

fn framed(declared_bytes: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_varint(declared_bytes, &mut out);
    out.extend_from_slice(body);
    out
}

fn framed_json(value: &Value) -> Vec<u8> {
    let body = value.to_string().into_bytes();
    framed(body.len() as u64, &body)
}

fn error_code(answer: &Value) -> &str {
    answer["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error envelope: {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_error_envelopes_and_the_node_keeps_serving() {
    bounded(async {
        let server = start(|_| {}, Handlers::repo(memory_repo())).await;
        let client_host = client_of(&server, |_| {}).await;
        let client = RepoClient::new(Arc::new(client_host.clone()), server.local_peer_id());
        let mut raw = RawClient::connect(&server);
        let later = now_ms() + 60_000;

        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("varint over 10 bytes", vec![0xff; 11], "bad-request"),
            ("varint overflow", [vec![0xff; 9], vec![0x7f]].concat(), "bad-request"),
            ("oversize length", framed(9 * 1024 * 1024, b"{}"), "bad-request"),
            ("huge length", framed(u64::MAX, b""), "bad-request"),
            ("truncated body", framed(100, b"{\"operations\":"), "bad-request"),
            ("truncated prefix", vec![0x80], "bad-request"),
            ("empty stream", vec![], "bad-request"),
            ("not UTF-8", framed(2, &[0xff, 0xfe]), "bad-request"),
            ("not JSON", framed(5, b"hello"), "bad-request"),
            (
                "unknown operation",
                framed_json(&json!({"operations": [{"frobnicate": {}}], "expiration": later})),
                "bad-request",
            ),
            ("no operation", framed_json(&json!({"operations": [], "expiration": later})), "bad-request"),
            (
                "expired",
                framed_json(&json!({"operations": [{"get": {"blockIds": ["b1"]}}], "expiration": 1})),
                "expired",
            ),
            (
                "invalid transform",
                framed_json(&json!({"operations": [{"pend": {"trxId": "t1", "transforms": {
                    "inserts": {"b1": {"header": {"id": "other", "type": "t", "collectionId": "c"}}},
                    "updates": {}, "deletes": []}, "policy": "c"}}], "expiration": later})),
                "bad-request",
            ),
            (
                "update of an unknown block",
                framed_json(&json!({"operations": [{"pend": {"trxId": "t1", "transforms": {
                    "updates": {"b1": [["text", 0, 0, "x"]]}}, "policy": "c"}}], "expiration": later})),
                "bad-request",
            ),
        ];
        for (name, bytes, code) in cases {
            let answer = raw.exchange(bytes).await;
            assert_eq!(error_code(&answer), code, "{name}: {answer}");
            // The node still answers valid requests, and nothing was stored.
            let state = get(&client, "b1", None).await;
            assert!(state[&id("b1")].state.pendings.is_empty() && state[&id("b1")].block.is_none(), "{name}");
        }
        let ok = raw
            .exchange(framed_json(&json!({"operations": [{"get": {"blockIds": ["b1"]}}], "expiration": later})))
            .await;
        assert!(ok["b1"]["state"].is_object(), "{ok}");

        // Through the typed client: envelopes become `NetworkError::Remote`.
        let err = client_host
            .request(
                server.local_peer_id(),
                ProtocolKind::Repo,
                json!({"operations": [{"nope": 1}], "expiration": later}),
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, NetworkError::Remote { ref code, .. } if code == "bad-request"), "{err}");
        // Protocols without a handler answer `unavailable`.
        let err = client_host
            .request(server.local_peer_id(), ProtocolKind::Sync, json!({}), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, NetworkError::Remote { ref code, .. } if code == "unavailable"), "{err}");
        // A request too large for the local limit is refused before it is sent.
        let err = client_host
            .request(
                server.local_peer_id(),
                ProtocolKind::Cluster,
                json!("x".repeat(2 * 1024 * 1024)),
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, NetworkError::Stream { .. }), "{err}");
        assert!(get(&client, "b1", None).await[&id("b1")].state.pendings.is_empty());

        client_host.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// A repository that never answers.
struct Silent;

#[async_trait]
impl Repo for Silent {
    async fn get(&self, _: &BlockGets, _: &MessageOptions) -> Result<GetBlockResults, RepoError> {
        std::future::pending().await
    }
    async fn pend(&self, _: &PendRequest, _: &MessageOptions) -> Result<PendResult, RepoError> {
        std::future::pending().await
    }
    async fn cancel(&self, _: &TrxBlocks, _: &MessageOptions) -> Result<(), RepoError> {
        std::future::pending().await
    }
    async fn commit(&self, _: &CommitRequest, _: &MessageOptions) -> Result<CommitResult, RepoError> {
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_times_out_within_the_deadline() {
    bounded(async {
        let server = start(|_| {}, Handlers::repo(Arc::new(Silent))).await;
        let client_host = client_of(&server, |c| c.max_outbound_per_protocol = 2).await;
        let client = RepoClient::new(Arc::new(client_host.clone()), server.local_peer_id());

        let started = Instant::now();
        let err = client
            .get(
                &BlockGets { block_ids: vec![id("b1")], context: None, read_mode: None },
                &MessageOptions::expiring_in(800),
            )
            .await
            .unwrap_err();
        let waited = started.elapsed();
        assert!(matches!(err, RepoError::Unavailable(_)), "{err}");
        assert!(waited >= Duration::from_millis(700) && waited < Duration::from_millis(2_500), "waited {waited:?}");

        let started = Instant::now();
        let err = client_host
            .request(
                server.local_peer_id(),
                ProtocolKind::Repo,
                json!({"operations": [{"get": {"blockIds": ["b1"]}}], "expiration": now_ms() + 60_000}),
                Duration::from_millis(300),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, NetworkError::Timeout { timeout_ms: 300, .. }), "{err}");
        assert!(started.elapsed() < Duration::from_millis(1_500), "waited {:?}", started.elapsed());

        // Both abandoned requests still hold their streams: the outbound bound (2) is reached.
        let err = client_host
            .request(server.local_peer_id(), ProtocolKind::Repo, json!({}), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err, NetworkError::Busy { limit: 2 });
        // Other protocols have their own bound.
        let err = client_host
            .request(server.local_peer_id(), ProtocolKind::Sync, json!({}), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, NetworkError::Remote { .. }), "{err}");

        client_host.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// A repository whose reads wait for a permit, announcing when one is waiting.
struct Gated {
    entered: Notify,
    gate: Semaphore,
    inner: Arc<dyn Repo>,
}

#[async_trait]
impl Repo for Gated {
    async fn get(&self, gets: &BlockGets, options: &MessageOptions) -> Result<GetBlockResults, RepoError> {
        self.entered.notify_one();
        let _permit = self.gate.acquire().await.map_err(|e| RepoError::Internal(e.to_string()))?;
        self.inner.get(gets, options).await
    }
    async fn pend(&self, request: &PendRequest, options: &MessageOptions) -> Result<PendResult, RepoError> {
        self.inner.pend(request, options).await
    }
    async fn cancel(&self, trx: &TrxBlocks, options: &MessageOptions) -> Result<(), RepoError> {
        self.inner.cancel(trx, options).await
    }
    async fn commit(&self, request: &CommitRequest, options: &MessageOptions) -> Result<CommitResult, RepoError> {
        self.inner.commit(request, options).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_inbound_bound_wait_in_the_queue_then_are_answered_busy() {
    bounded(async {
        let gated = Arc::new(Gated { entered: Notify::new(), gate: Semaphore::new(0), inner: memory_repo() });
        let server = start(
            |c| {
                c.max_inbound_per_protocol = 1;
                c.max_queued_inbound_per_protocol = 1;
            },
            Handlers::repo(gated.clone()),
        )
        .await;
        let client_host = client_of(&server, |_| {}).await;
        let client = RepoClient::new(Arc::new(client_host.clone()), server.local_peer_id());

        let first = {
            let client = client.clone();
            tokio::spawn(async move { get(&client, "b1", None).await })
        };
        gated.entered.notified().await;
        // The second request waits in the queue (one place), the third is refused.
        let second = {
            let client = client.clone();
            tokio::spawn(async move { get(&client, "b2", None).await })
        };
        while server.inbound_queued()["repo"] == 0 {
            tokio::task::yield_now().await;
        }
        let busy = client.get(&BlockGets { block_ids: vec![id("b1")], context: None, read_mode: None }, &soon()).await;
        assert!(matches!(busy, Err(RepoError::Busy(_))), "{busy:?}");
        assert_eq!(server.inbound_in_flight()["repo"], 1);
        assert_eq!(server.inbound_queued()["repo"], 1);

        gated.gate.add_permits(1);
        assert!(first.await.unwrap()[&id("b1")].block.is_none());
        gated.gate.add_permits(1);
        assert!(second.await.unwrap()[&id("b2")].block.is_none(), "the queued request is served in its turn");
        assert_eq!(server.inbound_queued()["repo"], 0);
        gated.gate.add_permits(1);
        assert!(get(&client, "b1", None).await[&id("b1")].block.is_none(), "served again once below the bound");

        client_host.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_failures_and_foreign_networks_are_typed_errors() {
    bounded(async {
        let server = start(|_| {}, Handlers::repo(memory_repo())).await;
        let client_host = start(|c| c.listen.clear(), Handlers::default()).await;

        // Nothing listens there: the dial fails fast.
        let nobody = identity::generate().public().to_peer_id();
        let closed_port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        client_host.add_address(nobody, format!("/ip4/127.0.0.1/tcp/{closed_port}").parse().unwrap()).await.unwrap();
        let err =
            client_host.request(nobody, ProtocolKind::Repo, json!({}), Duration::from_secs(10)).await.unwrap_err();
        assert!(matches!(err, NetworkError::DialFailed { .. }), "{err}");
        let unknown = identity::generate().public().to_peer_id();
        let err =
            client_host.request(unknown, ProtocolKind::Repo, json!({}), Duration::from_secs(10)).await.unwrap_err();
        assert!(matches!(err, NetworkError::DialFailed { .. }), "{err}");
        let err = client_host
            .request(client_host.local_peer_id(), ProtocolKind::Repo, json!({}), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, NetworkError::DialFailed { .. }), "{err}");

        // A node of another network (prefix) does not speak our protocols.
        let foreign = start(|c| c.protocol_prefix = "/other-net".into(), Handlers::repo(memory_repo())).await;
        client_host.add_address(foreign.local_peer_id(), foreign.listen_addrs()[0].clone()).await.unwrap();
        let err = client_host
            .request(foreign.local_peer_id(), ProtocolKind::Repo, json!({}), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            matches!(err, NetworkError::UnsupportedProtocol { ref protocol, .. } if protocol == "/db-p2p/repo/1.0.0"),
            "{err}"
        );

        // After shutdown nothing is sent.
        server.shutdown().await;
        server.shutdown().await;
        let err = server
            .request(client_host.local_peer_id(), ProtocolKind::Repo, json!({}), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err, NetworkError::Closed);

        foreign.shutdown().await;
        client_host.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persisted_identity_keeps_its_peer_id_across_restarts() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        for _ in 0..2 {
            let mut config = HostConfig::new(identity::load_or_create(dir.path()).unwrap());
            config.listen = vec![loopback()];
            let host = Host::start(config, Handlers::default()).await.unwrap();
            ids.push(host.local_peer_id());
            host.shutdown().await;
        }
        assert_eq!(ids[0], ids[1]);
        let mut bad = HostConfig::new(identity::generate());
        bad.max_inbound_per_protocol = 0;
        assert!(matches!(
            Host::start(bad, Handlers::default()).await,
            Err(optimystic_node::HostError::InvalidConfig(_))
        ));
    })
    .await;
}

#[cfg(feature = "quic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repo_round_trip_over_quic() {
    bounded(async {
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();
        let server = start(move |c| c.listen = vec![quic], Handlers::repo(memory_repo())).await;
        let client_host = client_of(&server, |_| {}).await;
        let client = RepoClient::new(Arc::new(client_host.clone()), server.local_peer_id());
        assert!(get(&client, "b1", None).await[&id("b1")].block.is_none());
        client_host.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_bootstrap_address_is_joined_kept_open_past_the_idle_timeout_and_redialled() {
    bounded(async {
        const IDLE_MS: u64 = 200;
        let server = start(|c| c.idle_connection_timeout_ms = IDLE_MS, Handlers::repo(memory_repo())).await;
        let plain = server.listen_addrs()[0].clone();
        let joined = start(
            |c| {
                c.idle_connection_timeout_ms = IDLE_MS;
                c.bootstrap = vec![plain.clone()];
                c.bootstrap_backoff_initial_ms = 50;
                c.bootstrap_backoff_max_ms = 200;
            },
            Handlers::default(),
        )
        .await;
        // The peer id is learned on connect and enters the routing table with the address dialled.
        let mut connectivity = joined.connectivity();
        let server_id = server.local_peer_id();
        connectivity.wait_for(|c| c.connected.contains(&server_id) && c.routing_table_peers == 1).await.unwrap();
        // Identify may add the server's own listen addresses beside it.
        let entry = joined.known_peers().await[&server.local_peer_id()].multiaddrs.clone();
        let dialled = format!("{plain}/p2p/{}", server.local_peer_id());
        assert!(entry.contains(&dialled), "{entry:?} lacks the address dialled, {dialled}");

        // An ordinary connection closes once idle ...
        let client_host = client_of(&server, |c| c.idle_connection_timeout_ms = IDLE_MS).await;
        let client = RepoClient::new(Arc::new(client_host.clone()), server.local_peer_id());
        assert!(get(&client, "b1", None).await[&id("b1")].block.is_none());
        client_host.connectivity().wait_for(|c| c.connected.is_empty()).await.unwrap();
        // ... the bootstrap connection does not: ten idle timeouts pass with it open.
        let dropped = tokio::time::timeout(
            Duration::from_millis(10 * IDLE_MS),
            connectivity.wait_for(|c| !c.connected.contains(&server.local_peer_id())),
        )
        .await
        .map(|now| now.map(|c| c.clone()));
        assert!(dropped.is_err(), "the bootstrap connection closed: {dropped:?}");

        // The bootstrap peer goes away and comes back on the same address: it is dialled again.
        let port = plain.iter().find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        });
        server.shutdown().await;
        connectivity.wait_for(|c| c.connected.is_empty()).await.unwrap();
        let again = start(
            |c| c.listen = vec![format!("/ip4/127.0.0.1/tcp/{}", port.unwrap()).parse().unwrap()],
            Handlers::repo(memory_repo()),
        )
        .await;
        connectivity.wait_for(|c| c.connected.contains(&again.local_peer_id())).await.unwrap();
        for host in [client_host, joined, again] {
            host.shutdown().await;
        }
    })
    .await;
}

/// A peer that stays unreachable past `peer_departed_after_ms` leaves the live routing table (so
/// every cluster view); when it comes back on its address with its identity, it rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_peer_leaves_the_views_and_rejoins_when_it_returns() {
    bounded(async {
        const DEPARTED_AFTER_MS: u64 = 1_000;
        let quick = |c: &mut HostConfig| c.peer_departed_after_ms = DEPARTED_AFTER_MS;
        let a = start(quick, Handlers::repo(memory_repo())).await;
        let keypair = identity::generate();
        let leaving_config = |c: &mut HostConfig| {
            quick(c);
            c.keypair = keypair.clone();
            c.bootstrap = vec![a.p2p_addrs()[0].clone()];
        };
        let leaving = start(leaving_config, Handlers::repo(memory_repo())).await;
        let gone = leaving.local_peer_id();
        let port = leaving.listen_addrs()[0].iter().find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        });
        await_routing_tables(std::slice::from_ref(&a), 1).await;
        assert!(a.known_peers().await.contains_key(&gone));

        let mut updates = a.routing_updates();
        leaving.shutdown().await;
        let started = Instant::now();
        while a.known_peers().await.contains_key(&gone) {
            updates.changed().await.unwrap();
        }
        assert!(
            started.elapsed() >= Duration::from_millis(DEPARTED_AFTER_MS),
            "left the views after {:?}, before the threshold",
            started.elapsed()
        );

        let back = start(
            |c| {
                leaving_config(c);
                c.listen = vec![format!("/ip4/127.0.0.1/tcp/{}", port.unwrap()).parse().unwrap()];
            },
            Handlers::repo(memory_repo()),
        )
        .await;
        while !a.known_peers().await.contains_key(&gone) {
            updates.changed().await.unwrap();
        }
        for host in [a, back] {
            host.shutdown().await;
        }
    })
    .await;
}

//! The node's libp2p host: one swarm (TCP, optionally QUIC, with Noise and Yamux; identify, ping,
//! Kademlia in server mode on `<prefix>/kad/1.0.0`, and request-response on the repo, cluster and
//! sync protocols), driven by one task and controlled through the cloneable [`HostHandle`].
//!
//! The handle implements [`PeerNetwork`] (one framed request, one response, with dial and
//! response deadlines and bounded outbound concurrency) and [`PeerRouting`] (the Kademlia routing
//! table and iterative lookups). Inbound requests go to the [`Handlers`] installed with
//! [`Host::start`] or later with [`HostHandle::set_handlers`]; each runs on its own task, never on
//! the swarm task.
//!
//! Joining cannot fail silently: every bootstrap address is redialled with capped exponential
//! backoff until a connection stands (and again whenever the node has lost every connection), each
//! failed dial is logged at `warn` with its address and reason, and the peer reached goes into the
//! routing table with the address dialled (see `bootstrap.rs`); that connection is kept open while
//! both ends run (`keep_alive.rs`). [`HostHandle::connectivity`] publishes the connected peers and
//! the routing-table size on every change.

mod behaviour;
mod bootstrap;
mod coalesce;
mod departures;
mod keep_alive;
mod task;

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use libp2p::identity::{Keypair, PeerId};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, Swarm};
use optimystic_core::BlockId;
use optimystic_core::keynet::{ClusterPeers, KeyNetworkError, PeerRouting};
use optimystic_core::network::{NetworkError, PeerNetwork, ProtocolKind};
use optimystic_core::wire::DEFAULT_PROTOCOL_PREFIX;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::codec::{
    DEFAULT_CLUSTER_MAX_FRAME_BYTES, DEFAULT_MAX_RESPONSE_FRAME_BYTES, DEFAULT_REPO_MAX_FRAME_BYTES,
    DEFAULT_SYNC_MAX_FRAME_BYTES, Frame, HARD_MAX_FRAME_BYTES,
};
use crate::service::{
    DEFAULT_MAX_INBOUND_PER_PROTOCOL, DEFAULT_MAX_QUEUED_INBOUND_PER_PROTOCOL, Handlers, PerProtocol, Services,
};
use task::{Command, SwarmTask};

/// Default bound on outbound requests in flight, per protocol.
pub const DEFAULT_MAX_OUTBOUND_PER_PROTOCOL: usize = 64;
/// Default response deadline: also the longest any request may take, inbound or outbound.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Default deadline for a connection attempt (TCP connect plus Noise and Yamux handshakes).
pub const DEFAULT_DIAL_TIMEOUT_MS: u64 = 5_000;
/// Default time an unused connection stays open.
pub const DEFAULT_IDLE_CONNECTION_TIMEOUT_MS: u64 = 60_000;
/// Default [`HostConfig::peer_departed_after_ms`]: longer than a restart, a pause or a short
/// partition.
pub const DEFAULT_PEER_DEPARTED_AFTER_MS: u64 = 30_000;
/// Default deadline of one iterative Kademlia lookup.
pub const DEFAULT_KAD_QUERY_TIMEOUT_MS: u64 = 10_000;
/// Default deadline for binding every listen address at start.
pub const DEFAULT_STARTUP_TIMEOUT_MS: u64 = 10_000;
/// Default bound on established connections (and on pending inbound ones).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 512;
/// Default bound on established connections to one peer.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: u32 = 4;
/// Default delay before the second dial of a bootstrap address; it doubles after each failure.
pub const DEFAULT_BOOTSTRAP_BACKOFF_INITIAL_MS: u64 = 250;
/// Default cap of the delay between dials of one bootstrap address.
pub const DEFAULT_BOOTSTRAP_BACKOFF_MAX_MS: u64 = 10_000;
/// Capacity of the command queue from handles to the swarm task.
const COMMAND_QUEUE_CAPACITY: usize = 1024;

/// What the host needs to start. Build it with [`HostConfig::new`] and override fields; every
/// limit is validated by [`Host::start`].
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// The node's identity (Ed25519; see [`crate::identity`]).
    pub keypair: Keypair,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/4001` (port 0 picks a free port). Empty: the
    /// node only dials out.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through, with or without a `/p2p/<peer id>` suffix. Each is dialled until a
    /// connection stands, with the delay between attempts growing from
    /// `bootstrap_backoff_initial_ms` to `bootstrap_backoff_max_ms`; the peer reached enters the
    /// routing table with the address dialled (a peer named by `/p2p` enters it at start). When the
    /// node has lost every connection, all are dialled again.
    pub bootstrap: Vec<Multiaddr>,
    /// Delay after the first failed dial of a bootstrap address; doubled after each further one.
    pub bootstrap_backoff_initial_ms: u64,
    /// Cap of the delay between dials of one bootstrap address.
    pub bootstrap_backoff_max_ms: u64,
    /// A routing-table peer without a connection for this long whose dial then fails is left out
    /// of [`PeerRouting::known_peers`] (so out of every cluster view) until it connects again;
    /// disconnected peers are dialled every third of it. At least 1,000.
    pub peer_departed_after_ms: u64,
    /// Protocol id prefix, `/db-p2p` by default; nodes with different prefixes do not talk.
    pub protocol_prefix: String,
    /// Frame limit of the repo protocol, both directions.
    pub max_repo_frame_bytes: usize,
    /// Frame limit of the cluster protocol, both directions.
    pub max_cluster_frame_bytes: usize,
    /// Frame limit of the sync protocol, both directions.
    pub max_sync_frame_bytes: usize,
    /// Frame limit of repo and sync protocol responses (written and read), at least the request
    /// limits: reads must return any block that exists.
    pub max_response_frame_bytes: usize,
    /// Inbound requests handled at once per protocol; past it requests wait in a queue.
    pub max_inbound_per_protocol: usize,
    /// Inbound requests waiting for a handling slot per protocol (0: none wait); past it requests
    /// are answered `busy`.
    pub max_queued_inbound_per_protocol: usize,
    /// Outbound requests in flight per protocol; past it a request waits for one to end, and fails
    /// with [`NetworkError::Busy`] without being sent if none ends within its timeout.
    pub max_outbound_per_protocol: usize,
    /// The longest a request may take, inbound or outbound; outbound deadlines are capped by it.
    pub request_timeout_ms: u64,
    /// The longest one connection attempt may take.
    pub dial_timeout_ms: u64,
    /// How long an unused connection stays open.
    pub idle_connection_timeout_ms: u64,
    /// The longest one iterative Kademlia lookup may take.
    pub kad_query_timeout_ms: u64,
    /// The longest [`Host::start`] waits for the listen addresses to be bound.
    pub startup_timeout_ms: u64,
    /// Established connections in total (also the bound on pending inbound connections).
    pub max_connections: u32,
    /// Established connections per peer.
    pub max_connections_per_peer: u32,
}

impl HostConfig {
    /// The defaults (SPEC 3.1 limits), with the given identity and no listen or bootstrap address.
    pub fn new(keypair: Keypair) -> Self {
        Self {
            keypair,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            bootstrap_backoff_initial_ms: DEFAULT_BOOTSTRAP_BACKOFF_INITIAL_MS,
            bootstrap_backoff_max_ms: DEFAULT_BOOTSTRAP_BACKOFF_MAX_MS,
            peer_departed_after_ms: DEFAULT_PEER_DEPARTED_AFTER_MS,
            protocol_prefix: DEFAULT_PROTOCOL_PREFIX.to_owned(),
            max_repo_frame_bytes: DEFAULT_REPO_MAX_FRAME_BYTES,
            max_cluster_frame_bytes: DEFAULT_CLUSTER_MAX_FRAME_BYTES,
            max_sync_frame_bytes: DEFAULT_SYNC_MAX_FRAME_BYTES,
            max_response_frame_bytes: DEFAULT_MAX_RESPONSE_FRAME_BYTES,
            max_inbound_per_protocol: DEFAULT_MAX_INBOUND_PER_PROTOCOL,
            max_queued_inbound_per_protocol: DEFAULT_MAX_QUEUED_INBOUND_PER_PROTOCOL,
            max_outbound_per_protocol: DEFAULT_MAX_OUTBOUND_PER_PROTOCOL,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            dial_timeout_ms: DEFAULT_DIAL_TIMEOUT_MS,
            idle_connection_timeout_ms: DEFAULT_IDLE_CONNECTION_TIMEOUT_MS,
            kad_query_timeout_ms: DEFAULT_KAD_QUERY_TIMEOUT_MS,
            startup_timeout_ms: DEFAULT_STARTUP_TIMEOUT_MS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
        }
    }

    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> Result<(), HostError> {
        let invalid = |what: String| Err(HostError::InvalidConfig(what));
        if !self.protocol_prefix.starts_with('/') || self.protocol_prefix.ends_with('/') {
            return invalid(format!(
                "protocol_prefix {:?} must start with '/' and not end with one",
                self.protocol_prefix
            ));
        }
        if self.protocol_prefix.chars().any(char::is_whitespace) {
            return invalid(format!("protocol_prefix {:?} contains whitespace", self.protocol_prefix));
        }
        for (name, bytes) in [
            ("max_repo_frame_bytes", self.max_repo_frame_bytes),
            ("max_cluster_frame_bytes", self.max_cluster_frame_bytes),
            ("max_sync_frame_bytes", self.max_sync_frame_bytes),
            ("max_response_frame_bytes", self.max_response_frame_bytes),
        ] {
            if !(1..=HARD_MAX_FRAME_BYTES).contains(&bytes) {
                return invalid(format!("{name} = {bytes} must be between 1 and {HARD_MAX_FRAME_BYTES}"));
            }
        }
        for (name, count) in [
            ("max_inbound_per_protocol", self.max_inbound_per_protocol),
            ("max_outbound_per_protocol", self.max_outbound_per_protocol),
        ] {
            if !(1..=Semaphore::MAX_PERMITS).contains(&count) {
                return invalid(format!("{name} = {count} must be at least 1"));
            }
        }
        for (name, ms) in [
            ("request_timeout_ms", self.request_timeout_ms),
            ("dial_timeout_ms", self.dial_timeout_ms),
            ("idle_connection_timeout_ms", self.idle_connection_timeout_ms),
            ("kad_query_timeout_ms", self.kad_query_timeout_ms),
            ("startup_timeout_ms", self.startup_timeout_ms),
            ("bootstrap_backoff_initial_ms", self.bootstrap_backoff_initial_ms),
        ] {
            if ms == 0 {
                return invalid(format!("{name} must be at least 1"));
            }
        }
        if self.bootstrap_backoff_max_ms < self.bootstrap_backoff_initial_ms {
            return invalid(format!(
                "bootstrap_backoff_max_ms = {} must be at least bootstrap_backoff_initial_ms = {}",
                self.bootstrap_backoff_max_ms, self.bootstrap_backoff_initial_ms
            ));
        }
        if self.peer_departed_after_ms < 1_000 {
            return invalid(format!("peer_departed_after_ms = {} must be at least 1000", self.peer_departed_after_ms));
        }
        if self.max_connections == 0 || self.max_connections_per_peer == 0 {
            return invalid("max_connections and max_connections_per_peer must be at least 1".to_owned());
        }
        if self.keypair.clone().try_into_ed25519().is_err() {
            return invalid("the identity must be an Ed25519 key (SPEC 3.1)".to_owned());
        }
        Ok(())
    }
}

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// A configuration value is invalid.
    #[error("invalid host configuration: {0}")]
    InvalidConfig(String),
    /// The transport stack could not be built.
    #[error("cannot build the transport: {0}")]
    Transport(String),
    /// A listen address could not be bound, e.g. because another process holds it (`reason` is
    /// then `address in use`).
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

/// What the host is connected to, as [`HostHandle::connectivity`] publishes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connectivity {
    /// Peers with at least one open connection.
    pub connected: BTreeSet<PeerId>,
    /// Peers in the Kademlia routing table, connected or not.
    pub routing_table_peers: usize,
}

/// Refuses a TCP listen address that a socket already listens on. Addresses without a fixed TCP
/// port (port 0, QUIC, DNS names) are left to the transport.
fn check_port_free(addr: &Multiaddr) -> Result<(), HostError> {
    let mut ip = None;
    let mut port = None;
    for protocol in addr.iter() {
        match protocol {
            Protocol::Ip4(v4) => ip = Some(std::net::IpAddr::V4(v4)),
            Protocol::Ip6(v6) => ip = Some(std::net::IpAddr::V6(v6)),
            Protocol::Tcp(p) => port = Some(p),
            _ => {}
        }
    }
    let (Some(ip), Some(port)) = (ip, port) else {
        return Ok(());
    };
    if port == 0 {
        return Ok(());
    }
    // std binds with SO_REUSEADDR only: sockets lingering in TIME_WAIT do not count as in use.
    match std::net::TcpListener::bind((ip, port)) {
        Ok(probe) => {
            drop(probe);
            Ok(())
        }
        Err(e) => Err(HostError::Listen { addr: addr.clone(), reason: io_reason(&e) }),
    }
}

/// A short reason for an I/O error: the common bind failures in words, others as the OS says.
fn io_reason(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => "address in use".to_owned(),
        std::io::ErrorKind::AddrNotAvailable => "address not available on this host".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        _ => error.to_string(),
    }
}

/// The reason of a transport error: its innermost I/O error if it has one (see [`io_reason`]),
/// else its innermost message. Some layers (`Either`) hide their inner error from `source`; an OS
/// error is then recognised by the `(os error N)` its message ends with.
pub(crate) fn error_reason(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    loop {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            // Transports wrap their errors in `io::Error::other`, whose `source` skips the wrapped
            // error itself: unwrap it by hand.
            match io.get_ref() {
                Some(inner) if io.kind() == std::io::ErrorKind::Other => {
                    current = inner;
                    continue;
                }
                _ => return io_reason(io),
            }
        }
        match current.source() {
            Some(next) => current = next,
            None => {
                let text = current.to_string();
                return match os_error_code(&text) {
                    Some(code) => io_reason(&std::io::Error::from_raw_os_error(code)),
                    None => text,
                };
            }
        }
    }
}

/// The `N` of a message ending in `(os error N)`, as `std::io::Error` displays OS errors.
fn os_error_code(text: &str) -> Option<i32> {
    text.strip_suffix(')')?.rsplit_once("(os error ")?.1.parse().ok()
}

/// Starts hosts.
#[derive(Debug)]
pub struct Host;

impl Host {
    /// Builds the swarm, binds every listen address (waiting at most `startup_timeout_ms`), starts
    /// dialling the bootstrap peers and starts the swarm task on the current tokio runtime.
    ///
    /// A TCP listen address another socket already listens on is refused with
    /// [`HostError::Listen`] (`address in use`), although libp2p-tcp would share the port (it sets
    /// `SO_REUSEPORT` on every listening socket, and no option turns that off): each such address
    /// is first bound once without `SO_REUSEPORT`, which the kernel refuses on a port in use.
    ///
    /// `handlers` may be empty ([`Handlers::default`]): install them later with
    /// [`HostHandle::set_handlers`], e.g. once a consensus built over this handle exists. Until then
    /// inbound requests are answered `unavailable`. Must be called within a tokio runtime.
    pub async fn start(config: HostConfig, handlers: Handlers) -> Result<HostHandle, HostError> {
        config.validate()?;
        let mut swarm: Swarm<behaviour::NodeBehaviour> = behaviour::build_swarm(&config)?;
        let local_peer_id = *swarm.local_peer_id();
        let mut listeners = Vec::with_capacity(config.listen.len());
        for addr in &config.listen {
            check_port_free(addr)?;
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| HostError::Listen { addr: addr.clone(), reason: error_reason(&e) })?;
            listeners.push((id, addr.clone()));
        }

        let services = Arc::new(Services::new(config.max_inbound_per_protocol, config.max_queued_inbound_per_protocol));
        services.set_handlers(handlers);
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE_CAPACITY);
        let (epoch_tx, epoch_rx) = watch::channel(0u64);
        let (connectivity_tx, connectivity_rx) = watch::channel(Connectivity::default());
        let listen_addrs = Arc::new(RwLock::new(Vec::new()));
        let published =
            task::Published { epoch: epoch_tx, connectivity: connectivity_tx, listen_addrs: Arc::clone(&listen_addrs) };
        let mut task = SwarmTask::new(swarm, &config, commands_rx, Arc::clone(&services), published)?;
        task.wait_listening(listeners, Duration::from_millis(config.startup_timeout_ms)).await?;
        task.start_bootstrap();
        let done = tokio::spawn(task.run());

        let outbound = PerProtocol::from_fn(|_| Arc::new(Semaphore::new(config.max_outbound_per_protocol)));
        tracing::info!(peer = %local_peer_id, addrs = ?listen_addrs.read().unwrap_or_else(PoisonError::into_inner), "host started");
        Ok(HostHandle {
            inner: Arc::new(Shared {
                local_peer_id,
                commands: commands_tx,
                outbound,
                max_outbound_per_protocol: config.max_outbound_per_protocol,
                request_timeout: Duration::from_millis(config.request_timeout_ms),
                kad_query_timeout: Duration::from_millis(config.kad_query_timeout_ms),
                services,
                epoch: epoch_rx,
                connectivity: connectivity_rx,
                listen_addrs,
                done: tokio::sync::Mutex::new(Some(done)),
            }),
        })
    }
}

/// A cloneable handle to a running host. All clones control the same swarm.
///
/// The swarm task stops on [`HostHandle::shutdown`], or when every handle is dropped and no
/// installed handler holds one. Handlers usually hold one (consensus sends through it), so call
/// `shutdown` to stop a node.
#[derive(Clone, Debug)]
pub struct HostHandle {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    local_peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    outbound: PerProtocol<Arc<Semaphore>>,
    max_outbound_per_protocol: usize,
    request_timeout: Duration,
    kad_query_timeout: Duration,
    services: Arc<Services>,
    epoch: watch::Receiver<u64>,
    connectivity: watch::Receiver<Connectivity>,
    listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    done: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl HostHandle {
    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.inner.local_peer_id
    }

    /// The addresses the node listens on now (ports resolved), without the `/p2p` suffix.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.inner.listen_addrs.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The listen addresses with this node's `/p2p/<peer id>` suffix, as other nodes' bootstrap
    /// configuration names them.
    pub fn p2p_addrs(&self) -> Vec<Multiaddr> {
        let peer = self.local_peer_id();
        self.listen_addrs().into_iter().map(|addr| addr.with(Protocol::P2p(peer))).collect()
    }

    /// Installs the handlers for inbound requests that start from now on (replacing any).
    pub fn set_handlers(&self, handlers: Handlers) {
        self.inner.services.set_handlers(handlers);
    }

    /// Inbound requests being handled now, per protocol name.
    pub fn inbound_in_flight(&self) -> std::collections::BTreeMap<&'static str, usize> {
        self.inner.services.in_flight()
    }

    /// Inbound requests waiting for a handling slot, by protocol name.
    pub fn inbound_queued(&self) -> std::collections::BTreeMap<&'static str, usize> {
        self.inner.services.queued()
    }

    /// Tells the host an address of a peer (it also enters the routing table). A trailing `/p2p`
    /// component must name the same peer.
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<(), NetworkError> {
        self.send(Command::AddAddress { peer, addr }).await
    }

    /// The peers with an open connection now.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetworkError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::ConnectedPeers(reply)).await?;
        answer.await.map_err(|_| NetworkError::Closed)
    }

    /// A receiver that sees the routing epoch (see [`PeerRouting::routing_epoch`]) change: await
    /// `changed()` to wait for routing table updates without polling.
    pub fn routing_updates(&self) -> watch::Receiver<u64> {
        self.inner.epoch.clone()
    }

    /// The connected peers and the routing-table size, updated on every connection and routing
    /// change: await `changed()` to follow them without polling.
    pub fn connectivity(&self) -> watch::Receiver<Connectivity> {
        self.inner.connectivity.clone()
    }

    /// Stops the swarm: open connections close, requests in flight fail with
    /// [`NetworkError::Closed`], inbound requests being served end, installed handlers are dropped. Waits for the swarm task to end.
    /// Idempotent.
    pub async fn shutdown(&self) {
        let (reply, stopped) = oneshot::channel();
        if self.inner.commands.send(Command::Shutdown(reply)).await.is_ok() {
            let _ = stopped.await;
        }
        if let Some(done) = self.inner.done.lock().await.take()
            && let Err(e) = done.await
        {
            tracing::error!(error = %e, "swarm task failed");
        }
    }

    async fn send(&self, command: Command) -> Result<(), NetworkError> {
        self.inner.commands.send(command).await.map_err(|_| NetworkError::Closed)
    }

    /// [`PeerNetwork::request`] of a request frame (owned or shared JSON).
    async fn request_frame(
        &self,
        peer: PeerId,
        protocol: ProtocolKind,
        request: Frame,
        timeout: Duration,
    ) -> Result<Value, NetworkError> {
        if peer == self.inner.local_peer_id {
            return Err(NetworkError::DialFailed { peer, reason: "a node does not send requests to itself".into() });
        }
        let timeout = timeout.min(self.inner.request_timeout);
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let deadline = tokio::time::Instant::now() + timeout;
        let busy = NetworkError::Busy { limit: self.inner.max_outbound_per_protocol };
        let semaphore = self.inner.outbound.get(protocol);
        let permit = match Arc::clone(semaphore).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => match tokio::time::timeout_at(deadline, Arc::clone(semaphore).acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) | Err(_) => return Err(busy),
            },
        };
        let exchange = async {
            let (reply, answer) = oneshot::channel();
            self.send(Command::Request { peer, kind: protocol, request, reply, permit }).await?;
            answer.await.map_err(|_| NetworkError::Closed)?
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(result) => result,
            Err(_) => Err(NetworkError::Timeout { peer, timeout_ms }),
        }
    }
}

#[async_trait]
impl PeerNetwork for HostHandle {
    fn local_peer_id(&self) -> PeerId {
        self.inner.local_peer_id
    }

    /// See [`PeerNetwork::request`]. The effective deadline is `min(timeout, request_timeout_ms)`
    /// and covers dialing (itself bounded by `dial_timeout_ms` per attempt), sending and the
    /// response. Waits while `max_outbound_per_protocol` requests of this protocol are in flight,
    /// and fails with [`NetworkError::Busy`] if none ends before the deadline; a request abandoned
    /// at its deadline stays counted until libp2p closes its stream (at most `request_timeout_ms`
    /// after it was sent).
    async fn request(
        &self,
        peer: PeerId,
        protocol: ProtocolKind,
        request: Value,
        timeout: Duration,
    ) -> Result<Value, NetworkError> {
        self.request_frame(peer, protocol, Frame::Json(request), timeout).await
    }

    /// See [`HostHandle::request`]; the shared JSON is written to the stream as it is, uncopied.
    async fn request_shared(
        &self,
        peer: PeerId,
        protocol: ProtocolKind,
        request: Arc<Value>,
        timeout: Duration,
    ) -> Result<Value, NetworkError> {
        self.request_frame(peer, protocol, Frame::Shared(request), timeout).await
    }
}

#[async_trait]
impl PeerRouting for HostHandle {
    fn local_peer_id(&self) -> PeerId {
        self.inner.local_peer_id
    }

    /// Every peer in the Kademlia routing table (connected or not) but departed ones (see
    /// [`HostConfig::peer_departed_after_ms`]), with its known addresses. Empty once the host has
    /// stopped.
    async fn known_peers(&self) -> ClusterPeers {
        let (reply, answer) = oneshot::channel();
        if self.send(Command::KnownPeers(reply)).await.is_err() {
            return ClusterPeers::new();
        }
        answer.await.unwrap_or_default()
    }

    /// An iterative Kademlia lookup. libp2p Kademlia hashes lookup keys, so the walk converges on
    /// `sha256(key)`; the peers it met and the routing table's are then ranked by XOR distance to
    /// `key` itself, and the closest 20 (the Kademlia `k`) returned. Bounded by
    /// `kad_query_timeout_ms`; a lookup that times out returns what it found. Fails with
    /// [`KeyNetworkError::Lookup`] when the host has stopped or too many lookups are running.
    async fn closest_peers(&self, block_id: &BlockId) -> Result<ClusterPeers, KeyNetworkError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::ClosestPeers { block_id: block_id.clone(), reply })
            .await
            .map_err(|e| KeyNetworkError::Lookup(e.to_string()))?;
        // The swarm task answers when the query ends; this bound only guards against a stuck task.
        let slack = Duration::from_secs(1);
        match tokio::time::timeout(self.inner.kad_query_timeout + slack, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(KeyNetworkError::Lookup(NetworkError::Closed.to_string())),
            Err(_) => Err(KeyNetworkError::Lookup("the lookup did not finish in time".into())),
        }
    }

    fn routing_epoch(&self) -> u64 {
        *self.inner.epoch.borrow()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn a_listen_address_in_use_is_refused_by_name() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        let error = check_port_free(&addr).unwrap_err();
        assert_eq!(error.to_string(), format!("cannot listen on {addr}: address in use"));
        drop(held);
        check_port_free(&addr).unwrap();
        check_port_free(&"/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
        check_port_free(&"/dns4/localhost/tcp/1".parse().unwrap()).unwrap();
    }

    #[test]
    fn reasons_name_the_os_error_even_behind_layers_that_hide_it() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(error_reason(&std::io::Error::other(refused)), "connection refused");
        #[derive(Debug, thiserror::Error)]
        #[error("{0}")]
        struct Opaque(String);
        let hidden = Opaque(std::io::Error::from_raw_os_error(111).to_string());
        assert_eq!(error_reason(&hidden), io_reason(&std::io::Error::from_raw_os_error(111)));
        assert_eq!(error_reason(&Opaque("no route".into())), "no route");
        assert_eq!(os_error_code("Connection refused (os error 111)"), Some(111));
        assert_eq!(os_error_code("os error"), None);
    }

    #[test]
    fn bootstrap_backoff_limits_are_validated() {
        let mut config = HostConfig::new(crate::identity::generate());
        config.bootstrap_backoff_initial_ms = 0;
        assert!(config.validate().unwrap_err().to_string().contains("bootstrap_backoff_initial_ms"));
        config.bootstrap_backoff_initial_ms = 500;
        config.bootstrap_backoff_max_ms = 100;
        assert!(config.validate().unwrap_err().to_string().contains("bootstrap_backoff_max_ms"));
        config.bootstrap_backoff_max_ms = 500;
        config.validate().unwrap();
    }
}

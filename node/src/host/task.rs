//! The swarm task: the only owner of the swarm. It executes handle commands, turns swarm events
//! into replies, and hands inbound requests to [`Services`] on spawned tasks.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::core::upgrade::NegotiationError;
use libp2p::identity::PeerId;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{DialError, SwarmEvent};
use libp2p::{Multiaddr, StreamProtocol, Swarm, identify, kad};
use optimystic_core::BlockId;
use optimystic_core::keynet::{ClusterPeers, KeyNetworkError, PeerInfo, block_key, rank_peers};
use optimystic_core::network::{NetworkError, ProtocolKind};
use optimystic_core::wire::ErrorEnvelope;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::behaviour::{MAX_IDENTIFY_ADDRS, NodeBehaviour, NodeBehaviourEvent, stream_protocol};
use super::bootstrap::Bootstrap;
use super::departures::Departures;
use super::{Connectivity, HostConfig, HostError, error_reason};
use crate::codec::Frame;
use crate::service::{PerProtocol, Services};

/// Kademlia's `k`: how many peers a lookup returns.
const LOOKUP_RESULT_PEERS: usize = 20;
/// Lookups running at once; more are refused.
const MAX_CONCURRENT_LOOKUPS: usize = 64;
/// Remembered dial errors (for error messages); the memory is cleared past this.
const MAX_REMEMBERED_DIAL_ERRORS: usize = 1024;

/// Where the result of a lookup goes.
type LookupReply = oneshot::Sender<Result<ClusterPeers, KeyNetworkError>>;

/// What a handle asks the swarm task to do.
#[derive(Debug)]
pub(crate) enum Command {
    Request {
        peer: PeerId,
        kind: ProtocolKind,
        request: Frame,
        reply: oneshot::Sender<Result<Value, NetworkError>>,
        permit: OwnedSemaphorePermit,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    KnownPeers(oneshot::Sender<ClusterPeers>),
    ClosestPeers {
        block_id: BlockId,
        reply: LookupReply,
    },
    Shutdown(oneshot::Sender<()>),
}

/// A handler's answer, on its way back to the swarm.
struct Answer {
    kind: ProtocolKind,
    channel: ResponseChannel<Value>,
    response: Value,
}

/// An outbound request waiting for its response. The permit counts it against the outbound bound
/// until libp2p reports its end, even if the caller stopped waiting.
struct Pending {
    peer: PeerId,
    reply: oneshot::Sender<Result<Value, NetworkError>>,
    _permit: OwnedSemaphorePermit,
}

/// What the swarm task publishes to the handles.
pub(crate) struct Published {
    /// The routing epoch, bumped on every routing-table change.
    pub(crate) epoch: watch::Sender<u64>,
    /// The connected peers and the routing-table size.
    pub(crate) connectivity: watch::Sender<Connectivity>,
    /// The bound listen addresses.
    pub(crate) listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
}

pub(crate) struct SwarmTask {
    swarm: Swarm<NodeBehaviour>,
    commands: mpsc::Receiver<Command>,
    answers_tx: mpsc::Sender<Answer>,
    answers: mpsc::Receiver<Answer>,
    services: Arc<Services>,
    /// The inbound requests being served, each a task of this one's: they end when it ends.
    inbound: JoinSet<()>,
    epoch: watch::Sender<u64>,
    connectivity: watch::Sender<Connectivity>,
    listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    bootstrap: Bootstrap,
    pending: HashMap<(ProtocolKind, OutboundRequestId), Pending>,
    lookups: HashMap<kad::QueryId, ([u8; 32], LookupReply)>,
    dial_errors: HashMap<PeerId, String>,
    departures: Departures,
    protocol_ids: PerProtocol<String>,
    kad_protocol: StreamProtocol,
    request_timeout_ms: u64,
}

impl SwarmTask {
    pub(crate) fn new(
        swarm: Swarm<NodeBehaviour>,
        config: &HostConfig,
        commands: mpsc::Receiver<Command>,
        services: Arc<Services>,
        published: Published,
    ) -> Result<Self, HostError> {
        // Every admitted request sends at most one answer, so this capacity is never the limit.
        let answers_capacity = config
            .max_inbound_per_protocol
            .saturating_add(config.max_queued_inbound_per_protocol)
            .saturating_mul(ProtocolKind::ALL.len())
            .max(1);
        let (answers_tx, answers) = mpsc::channel(answers_capacity);
        let bootstrap = Bootstrap::new(
            &config.bootstrap,
            *swarm.local_peer_id(),
            Duration::from_millis(config.bootstrap_backoff_initial_ms),
            Duration::from_millis(config.bootstrap_backoff_max_ms),
            Instant::now(),
        );
        Ok(Self {
            swarm,
            commands,
            answers_tx,
            answers,
            services,
            inbound: JoinSet::new(),
            epoch: published.epoch,
            connectivity: published.connectivity,
            listen_addrs: published.listen_addrs,
            bootstrap,
            pending: HashMap::new(),
            lookups: HashMap::new(),
            dial_errors: HashMap::new(),
            departures: Departures::new(Duration::from_millis(config.peer_departed_after_ms)),
            protocol_ids: PerProtocol::from_fn(|kind| kind.protocol_id(&config.protocol_prefix)),
            kad_protocol: stream_protocol(optimystic_core::wire::kad_protocol(&config.protocol_prefix))?,
            request_timeout_ms: config.request_timeout_ms,
        })
    }

    /// Drives the swarm until every listener has bound an address.
    pub(crate) async fn wait_listening(
        &mut self,
        listeners: Vec<(ListenerId, Multiaddr)>,
        timeout: Duration,
    ) -> Result<(), HostError> {
        let mut waiting: HashMap<ListenerId, Multiaddr> = listeners.into_iter().collect();
        let deadline = tokio::time::Instant::now() + timeout;
        while !waiting.is_empty() {
            let event = match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(event) => event,
                Err(_) => {
                    let addr = waiting.into_values().next().unwrap_or_else(Multiaddr::empty);
                    return Err(HostError::Listen { addr, reason: format!("not bound within {timeout:?}") });
                }
            };
            match &event {
                SwarmEvent::NewListenAddr { listener_id, .. } => {
                    waiting.remove(listener_id);
                }
                SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                    if let Some(addr) = waiting.remove(listener_id) {
                        let reason = match reason {
                            Ok(()) => "listener closed".to_owned(),
                            Err(e) => e.to_string(),
                        };
                        return Err(HostError::Listen { addr, reason });
                    }
                }
                SwarmEvent::ListenerError { listener_id, error } => {
                    if let Some(addr) = waiting.remove(listener_id) {
                        return Err(HostError::Listen { addr, reason: error.to_string() });
                    }
                }
                _ => {}
            }
            self.on_swarm_event(event);
        }
        Ok(())
    }

    /// Dials the bootstrap addresses for the first time. A node whose bootstrap peers are down
    /// still starts; the swarm task goes on dialling them (see `bootstrap.rs`). A peer an address
    /// names (`/p2p/<peer id>`) enters the routing table at once, so lookups and clusters count on
    /// it while the dial is in flight.
    pub(crate) fn start_bootstrap(&mut self) {
        for (peer, addr) in self.bootstrap.named_peers() {
            self.swarm.behaviour_mut().kad.add_address(&peer, addr);
        }
        self.dial_due_bootstrap();
        self.publish_connectivity();
    }

    /// Dials every bootstrap address that is due. An address naming a peer already connected
    /// counts as connected without a dial.
    fn dial_due_bootstrap(&mut self) {
        let now = Instant::now();
        for index in self.bootstrap.due(now) {
            let Some(target) = self.bootstrap.target(index) else {
                continue;
            };
            let (addr, dial_addr, peer) = (target.addr.clone(), target.dial_addr.clone(), target.peer);
            let opts = match peer {
                Some(peer) if self.swarm.is_connected(&peer) => {
                    self.bootstrap.already_connected(index, peer);
                    continue;
                }
                Some(peer) => {
                    DialOpts::peer_id(peer).addresses(vec![dial_addr]).condition(PeerCondition::Disconnected).build()
                }
                None => DialOpts::unknown_peer_id().address(dial_addr).build(),
            };
            let connection = opts.connection_id();
            self.swarm.behaviour_mut().keep_alive.keep(connection);
            match self.swarm.dial(opts) {
                Ok(()) => self.bootstrap.dialling(index, connection),
                Err(e) => {
                    if let Some(failure) = self.bootstrap.failed(index, now) {
                        log_bootstrap_failure(&failure, &dial_error_reason(&e));
                    } else {
                        tracing::warn!(%addr, reason = %dial_error_reason(&e), "cannot dial bootstrap peer");
                    }
                }
            }
        }
    }

    /// A connection to `peer` made through (or to the peer named by) a bootstrap address: the peer
    /// enters the routing table with the address dialled. A new entry makes Kademlia look the
    /// network up on its own shortly after (it waits briefly so that peers joining at the same
    /// time are found too); a peer already in the table gets an explicit bootstrap.
    fn joined_through(&mut self, peer: PeerId, addr: &Multiaddr, dial_addr: Multiaddr) {
        tracing::info!(%addr, %peer, "connected to bootstrap peer");
        let known = self.in_routing_table(&peer);
        let kad = &mut self.swarm.behaviour_mut().kad;
        if kad.add_address(&peer, dial_addr) == kad::RoutingUpdate::Failed {
            tracing::warn!(%addr, %peer, "bootstrap peer not added to the routing table (its bucket is full)");
        }
        if known && let Err(e) = kad.bootstrap() {
            tracing::debug!(error = %e, "kademlia bootstrap not started");
        }
    }

    fn in_routing_table(&mut self, peer: &PeerId) -> bool {
        let kad = &mut self.swarm.behaviour_mut().kad;
        kad.kbucket(*peer).is_some_and(|bucket| bucket.iter().any(|entry| entry.node.key.preimage() == peer))
    }

    /// Publishes the connected peers and the routing-table size if they changed.
    fn publish_connectivity(&mut self) {
        let connected = self.swarm.connected_peers().copied().collect();
        let routing_table_peers = self.swarm.behaviour_mut().kad.kbuckets().map(|bucket| bucket.num_entries()).sum();
        let now = Connectivity { connected, routing_table_peers };
        self.connectivity.send_if_modified(|published| {
            if *published == now {
                return false;
            }
            *published = now;
            true
        });
    }

    pub(crate) async fn run(mut self) {
        let mut stopped = None;
        let mut probe = tokio::time::interval(self.departures.probe_interval());
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_bootstrap = self.bootstrap.next_due();
            tokio::select! {
                () = sleep_until(next_bootstrap) => self.dial_due_bootstrap(),
                _ = probe.tick() => self.probe_disconnected(),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command.map(|c| self.on_command(c)) {
                    Some(ControlFlow::Continue(())) => {}
                    Some(ControlFlow::Break(reply)) => {
                        stopped = Some(reply);
                        break;
                    }
                    None => break,
                },
                Some(answer) = self.answers.recv() => self.on_answer(answer),
            }
        }
        // Drop the handlers (they may hold handles), the inbound requests being served and every
        // pending reply: waiting callers see `Closed`.
        self.services.set_handlers(crate::service::Handlers::default());
        let peer = *self.swarm.local_peer_id();
        drop(self);
        tracing::info!(%peer, "host stopped");
        if let Some(reply) = stopped {
            let _ = reply.send(());
        }
    }

    /// A dial to a routing-table peer failed: past the departure threshold it leaves the views.
    fn dial_to_peer_failed(&mut self, peer: PeerId) {
        let now = Instant::now();
        if self.swarm.is_connected(&peer) || !self.departures.dial_failed(peer, now) {
            return;
        }
        let unreachable_s = self.departures.unreachable_for(&peer, now).map_or(0, |d| d.as_secs());
        tracing::warn!(%peer, unreachable_s, "a peer is unreachable; it is left out of the cluster views until it connects again");
        self.bump_epoch();
    }

    /// Forgets tracked peers Kademlia dropped, then dials a few disconnected ones: a failure can
    /// make a peer depart, a connection brings a departed one back.
    fn probe_disconnected(&mut self) {
        let mut in_table = HashSet::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                in_table.insert(*entry.node.key.preimage());
            }
        }
        if self.departures.retain(|peer| in_table.contains(peer)) {
            self.bump_epoch();
        }
        for peer in self.departures.probes() {
            if self.swarm.is_connected(&peer) {
                continue;
            }
            let dial = DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing).build();
            if let Err(e) = self.swarm.dial(dial) {
                tracing::debug!(%peer, error = %e, "probe dial of a disconnected peer failed at once");
                self.dial_to_peer_failed(peer);
            }
        }
    }

    fn bump_epoch(&self) {
        self.epoch.send_modify(|epoch| *epoch = epoch.wrapping_add(1));
    }

    /// Executes one command; `Break` carries the reply of a shutdown.
    fn on_command(&mut self, command: Command) -> ControlFlow<oneshot::Sender<()>> {
        match command {
            Command::Request { peer, kind, request, reply, permit } => {
                if reply.is_closed() {
                    return ControlFlow::Continue(());
                }
                let id = self.swarm.behaviour_mut().protocol(kind).send_request(&peer, request);
                self.pending.insert((kind, id), Pending { peer, reply, _permit: permit });
            }
            Command::AddAddress { peer, addr } => {
                if self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone()) == kad::RoutingUpdate::Failed {
                    tracing::debug!(%peer, %addr, "address not added to the routing table");
                }
                self.swarm.add_peer_address(peer, addr);
                self.publish_connectivity();
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::KnownPeers(reply) => {
                let _ = reply.send(self.routing_table());
            }
            Command::ClosestPeers { block_id, reply } => {
                if self.lookups.len() >= MAX_CONCURRENT_LOOKUPS {
                    let _ = reply.send(Err(KeyNetworkError::Lookup(format!(
                        "{MAX_CONCURRENT_LOOKUPS} lookups are already running"
                    ))));
                    return ControlFlow::Continue(());
                }
                // Kademlia hashes the lookup key: the walk converges on sha256(blockId).
                let id = self.swarm.behaviour_mut().kad.get_closest_peers(block_id.as_bytes().to_vec());
                self.lookups.insert(id, (block_key(&block_id), reply));
            }
            Command::Shutdown(reply) => return ControlFlow::Break(reply),
        }
        ControlFlow::Continue(())
    }

    fn routing_table(&mut self) -> ClusterPeers {
        let mut peers = ClusterPeers::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                let peer = *entry.node.key.preimage();
                if self.departures.is_departed(&peer) {
                    continue;
                }
                let multiaddrs = entry.node.value.iter().map(ToString::to_string).collect();
                peers.insert(peer, PeerInfo { multiaddrs });
            }
        }
        peers
    }

    fn on_answer(&mut self, answer: Answer) {
        let Answer { kind, channel, response } = answer;
        if self.swarm.behaviour_mut().protocol(kind).send_response(channel, response).is_err() {
            tracing::debug!(protocol = kind.name(), "response not sent: the requester is gone or timed out");
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<NodeBehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(NodeBehaviourEvent::Repo(e)) => self.on_request_response(ProtocolKind::Repo, e),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Cluster(e)) => {
                self.on_request_response(ProtocolKind::Cluster, e);
            }
            SwarmEvent::Behaviour(NodeBehaviourEvent::Sync(e)) => self.on_request_response(ProtocolKind::Sync, e),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Identify(e)) => self.on_identify(e),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Ping(_) | NodeBehaviourEvent::Limits(_)) => {}
            SwarmEvent::Behaviour(NodeBehaviourEvent::KeepAlive(never)) => match never {},
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::debug!(%address, "listening");
                let mut addrs = self.listen_addrs.write().unwrap_or_else(PoisonError::into_inner);
                if !addrs.contains(&address) {
                    addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.write().unwrap_or_else(PoisonError::into_inner).retain(|a| *a != address);
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, .. } => {
                self.dial_errors.remove(&peer_id);
                if self.departures.connected(&peer_id) {
                    tracing::info!(peer = %peer_id, "a departed peer is back; it rejoins the cluster views");
                    self.bump_epoch();
                }
                for target in self.bootstrap.connected(connection_id, peer_id) {
                    self.joined_through(peer_id, &target.addr, target.dial_addr);
                }
                self.publish_connectivity();
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established, .. } => {
                if num_established == 0 {
                    self.departures.disconnected(peer_id, Instant::now());
                }
                if self.swarm.connected_peers().next().is_none() && self.bootstrap.rearm(Instant::now()) {
                    tracing::info!("every connection is closed; dialling the bootstrap peers again");
                }
                self.publish_connectivity();
            }
            SwarmEvent::OutgoingConnectionError { peer_id, connection_id, error } => {
                if let Some(failure) = self.bootstrap.dial_failed(connection_id, Instant::now()) {
                    log_bootstrap_failure(&failure, &dial_error_reason(&error));
                }
                if let Some(peer) = peer_id {
                    if self.dial_errors.len() >= MAX_REMEMBERED_DIAL_ERRORS {
                        self.dial_errors.clear();
                    }
                    self.dial_errors.insert(peer, dial_error_detail(&error));
                    self.dial_to_peer_failed(peer);
                }
                // Kademlia forgets addresses that fail.
                self.publish_connectivity();
            }
            other => tracing::trace!(event = ?other, "swarm event"),
        }
    }

    fn on_identify(&mut self, event: identify::Event) {
        let identify::Event::Received { peer_id, info, .. } = event else {
            return;
        };
        let kad = &mut self.swarm.behaviour_mut().kad;
        if info.protocols.contains(&self.kad_protocol) {
            for addr in info.listen_addrs.into_iter().take(MAX_IDENTIFY_ADDRS) {
                kad.add_address(&peer_id, addr);
            }
        } else if kad.remove_peer(&peer_id).is_some() {
            // A peer of another network (other prefix) or one that stopped serving the DHT.
            self.bump_epoch();
            self.publish_connectivity();
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::RoutingUpdated { is_new_peer, old_peer, .. } => {
                if is_new_peer || old_peer.is_some() {
                    self.bump_epoch();
                    self.publish_connectivity();
                }
            }
            kad::Event::OutboundQueryProgressed { id, result: kad::QueryResult::GetClosestPeers(result), .. } => {
                let Some((key, reply)) = self.lookups.remove(&id) else {
                    return;
                };
                let found = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                let mut candidates = self.routing_table();
                for peer in found {
                    let info = candidates.entry(peer.peer_id).or_default();
                    for addr in peer.addrs {
                        let text = addr.to_string();
                        if !info.multiaddrs.contains(&text) {
                            info.multiaddrs.push(text);
                        }
                    }
                }
                let closest: HashSet<PeerId> =
                    rank_peers(&key, candidates.keys(), LOOKUP_RESULT_PEERS).into_iter().collect();
                candidates.retain(|peer, _| closest.contains(peer));
                let _ = reply.send(Ok(candidates));
            }
            other => tracing::trace!(event = ?other, "kademlia event"),
        }
    }

    fn on_request_response(&mut self, kind: ProtocolKind, event: request_response::Event<Frame, Value>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    self.on_inbound(kind, peer, request, channel);
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(pending) = self.pending.remove(&(kind, request_id)) {
                        let result = match ErrorEnvelope::from_response(&response) {
                            Some(envelope) => Err(NetworkError::Remote {
                                peer: pending.peer,
                                code: envelope.error.code,
                                message: envelope.error.message,
                            }),
                            None => Ok(response),
                        };
                        let _ = pending.reply.send(result);
                    }
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                if let Some(pending) = self.pending.remove(&(kind, request_id)) {
                    let error = self.outbound_error(kind, peer, error);
                    let _ = pending.reply.send(Err(error));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(protocol = kind.name(), %peer, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn outbound_error(&mut self, kind: ProtocolKind, peer: PeerId, error: OutboundFailure) -> NetworkError {
        match error {
            OutboundFailure::DialFailure => {
                let reason = self.dial_errors.remove(&peer).unwrap_or_else(|| "no connection could be made".to_owned());
                NetworkError::DialFailed { peer, reason }
            }
            OutboundFailure::Timeout => NetworkError::Timeout { peer, timeout_ms: self.request_timeout_ms },
            OutboundFailure::UnsupportedProtocols => {
                NetworkError::UnsupportedProtocol { peer, protocol: self.protocol_ids.get(kind).clone() }
            }
            OutboundFailure::ConnectionClosed => {
                NetworkError::Stream { peer, reason: "connection closed before the response".to_owned() }
            }
            // With lazy negotiation a peer that lacks the protocol refuses it on the stream itself.
            OutboundFailure::Io(e)
                if e.get_ref().is_some_and(|inner| {
                    matches!(inner.downcast_ref::<NegotiationError>(), Some(NegotiationError::Failed))
                }) =>
            {
                NetworkError::UnsupportedProtocol { peer, protocol: self.protocol_ids.get(kind).clone() }
            }
            OutboundFailure::Io(e) => NetworkError::Stream { peer, reason: e.to_string() },
        }
    }

    fn on_inbound(&mut self, kind: ProtocolKind, peer: PeerId, request: Frame, channel: ResponseChannel<Value>) {
        match self.services.admit(kind) {
            Err(busy) => {
                tracing::debug!(protocol = kind.name(), %peer, "inbound bound reached; answering busy");
                let _ = self.swarm.behaviour_mut().protocol(kind).send_response(channel, busy);
            }
            Ok(admission) => {
                let services = Arc::clone(&self.services);
                let answers = self.answers_tx.clone();
                while self.inbound.try_join_next().is_some() {}
                self.inbound.spawn(async move {
                    let (response, permit) = match admission.ready().await {
                        // The requester gave up while the request waited: nothing to answer.
                        Ok(_) if !channel.is_open() => return,
                        Ok(permit) => (services.serve(kind, peer, request).await, Some(permit)),
                        Err(refusal) => (refusal, None),
                    };
                    let _ = answers.send(Answer { kind, channel, response }).await;
                    drop(permit);
                });
            }
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One `warn` line per failed bootstrap dial (one per backoff step: a dial names one address).
fn log_bootstrap_failure(failure: &super::bootstrap::Failure, reason: &str) {
    let retry_in_ms = u64::try_from(failure.retry_in.as_millis()).unwrap_or(u64::MAX);
    tracing::warn!(
        addr = %failure.addr,
        %reason,
        failures = failure.failures,
        retry_in_ms,
        "cannot reach bootstrap peer; retrying"
    );
}

/// Why a dial failed, naming each address tried with its reason (for request errors).
fn dial_error_detail(error: &DialError) -> String {
    match error {
        DialError::Transport(attempts) if !attempts.is_empty() => {
            attempts.iter().map(|(addr, e)| format!("{addr}: {}", error_reason(e))).collect::<Vec<_>>().join("; ")
        }
        other => dial_error_reason(other),
    }
}

/// Why a dial failed, in a few words: the transport's innermost reason for each address tried.
fn dial_error_reason(error: &DialError) -> String {
    match error {
        DialError::Transport(attempts) if !attempts.is_empty() => {
            attempts.iter().map(|(_, e)| error_reason(e)).collect::<Vec<_>>().join("; ")
        }
        DialError::WrongPeerId { obtained, .. } => {
            format!("the peer there is {obtained}, not the one named")
        }
        other => other.to_string(),
    }
}

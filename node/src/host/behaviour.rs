//! The swarm: transport stack and the composed network behaviour.

use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::identity::{Keypair, PeerId};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{StreamProtocol, Swarm, Transport, connection_limits, dns, identify, kad, noise, ping, tcp, yamux};
use optimystic_core::network::ProtocolKind;

use super::coalesce::{Coalescing, MarkingExecutor};
use super::{HostConfig, HostError, keep_alive};
use crate::codec::FrameCodec;

/// Extra inbound stream slots per connection beyond the in-flight bounds, so requests past the
/// bound can still be read and answered `busy` instead of being dropped.
const BUSY_STREAM_HEADROOM: usize = 32;
/// The most listen addresses taken from one peer's identify report.
pub(crate) const MAX_IDENTIFY_ADDRS: usize = 16;

/// Everything the node speaks.
#[derive(NetworkBehaviour)]
pub(crate) struct NodeBehaviour {
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) keep_alive: keep_alive::Behaviour,
    pub(crate) repo: request_response::Behaviour<FrameCodec>,
    pub(crate) cluster: request_response::Behaviour<FrameCodec>,
    pub(crate) sync: request_response::Behaviour<FrameCodec>,
}

impl NodeBehaviour {
    /// The request-response behaviour of a protocol.
    pub(crate) fn protocol(&mut self, kind: ProtocolKind) -> &mut request_response::Behaviour<FrameCodec> {
        match kind {
            ProtocolKind::Repo => &mut self.repo,
            ProtocolKind::Cluster => &mut self.cluster,
            ProtocolKind::Sync => &mut self.sync,
        }
    }
}

/// A stream protocol id under the configured prefix.
pub(crate) fn stream_protocol(id: String) -> Result<StreamProtocol, HostError> {
    StreamProtocol::try_from_owned(id.clone())
        .map_err(|e| HostError::InvalidConfig(format!("protocol id {id:?} is invalid: {e}")))
}

/// TCP (and QUIC with the `quic` feature) with Noise and Yamux, behind DNS resolution. Every
/// connection attempt, dialled or accepted, must finish its handshakes within the dial timeout.
/// Yamux writes through a [`Coalescing`] socket, so the frames of one connection-task poll go
/// out in one Noise message (see `coalesce.rs`).
fn build_transport(keypair: &Keypair, dial_timeout: Duration) -> Result<Boxed<(PeerId, StreamMuxerBox)>, HostError> {
    let noise = noise::Config::new(keypair).map_err(|e| HostError::Transport(format!("noise: {e}")))?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
        .upgrade(Version::V1Lazy)
        .authenticate(noise)
        .multiplex(Coalescing(yamux::Config::default()))
        .timeout(dial_timeout)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    #[cfg(feature = "quic")]
    let tcp = {
        let mut quic_config = libp2p::quic::Config::new(keypair);
        quic_config.handshake_timeout = dial_timeout;
        let quic = libp2p::quic::tokio::Transport::new(quic_config)
            .map(|(peer, connection), _| (peer, StreamMuxerBox::new(connection)));
        tcp.or_transport(quic).map(|either, _| either.into_inner())
    };
    let transport = dns::tokio::Transport::system(tcp).map_err(|e| HostError::Transport(format!("dns: {e}")))?;
    Ok(transport.boxed())
}

fn request_response_behaviour(
    config: &HostConfig,
    kind: ProtocolKind,
    codec: FrameCodec,
) -> Result<request_response::Behaviour<FrameCodec>, HostError> {
    let protocol = stream_protocol(kind.protocol_id(&config.protocol_prefix))?;
    let streams = config
        .max_inbound_per_protocol
        .saturating_add(config.max_queued_inbound_per_protocol)
        .saturating_add(config.max_outbound_per_protocol)
        .saturating_add(BUSY_STREAM_HEADROOM);
    let rr_config = request_response::Config::default()
        .with_request_timeout(Duration::from_millis(config.request_timeout_ms))
        .with_max_concurrent_streams(streams);
    Ok(request_response::Behaviour::with_codec(codec, [(protocol, ProtocolSupport::Full)], rr_config))
}

/// The codec of a protocol whose responses carry blocks or revisions: requests within
/// `max_frame_bytes`, responses within the larger `max_response_frame_bytes`.
fn reads_codec(max_frame_bytes: usize, max_response_frame_bytes: usize) -> FrameCodec {
    FrameCodec::new(max_frame_bytes).with_max_response_frame_bytes(max_response_frame_bytes.max(max_frame_bytes))
}

/// Builds the swarm for a validated configuration.
pub(crate) fn build_swarm(config: &HostConfig) -> Result<Swarm<NodeBehaviour>, HostError> {
    let keypair = &config.keypair;
    let local_peer_id = keypair.public().to_peer_id();
    let transport = build_transport(keypair, Duration::from_millis(config.dial_timeout_ms))?;

    let mut kad_config =
        kad::Config::new(stream_protocol(optimystic_core::wire::kad_protocol(&config.protocol_prefix))?);
    kad_config.set_query_timeout(Duration::from_millis(config.kad_query_timeout_ms));
    let mut kad = kad::Behaviour::with_config(local_peer_id, kad::store::MemoryStore::new(local_peer_id), kad_config);
    kad.set_mode(Some(kad::Mode::Server));

    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(config.max_connections_per_peer))
        .with_max_pending_incoming(Some(config.max_connections));

    let keep_alive_protocol = stream_protocol(format!("{}/keep-alive/1.0.0", config.protocol_prefix))?;
    let behaviour = NodeBehaviour {
        limits: connection_limits::Behaviour::new(limits),
        identify: identify::Behaviour::new(
            identify::Config::new(config.protocol_prefix.clone(), keypair.public())
                .with_agent_version(format!("optimystic-node/{}", env!("CARGO_PKG_VERSION"))),
        ),
        ping: ping::Behaviour::default(),
        kad,
        keep_alive: keep_alive::Behaviour::new(keep_alive_protocol),
        repo: request_response_behaviour(
            config,
            ProtocolKind::Repo,
            reads_codec(config.max_repo_frame_bytes, config.max_response_frame_bytes),
        )?,
        cluster: request_response_behaviour(
            config,
            ProtocolKind::Cluster,
            FrameCodec::new(config.max_cluster_frame_bytes),
        )?,
        sync: request_response_behaviour(
            config,
            ProtocolKind::Sync,
            reads_codec(config.max_sync_frame_bytes, config.max_response_frame_bytes),
        )?,
    };
    // Lazy negotiation: a request's protocol id travels with its first frame instead of costing a
    // round trip of its own. A peer that lacks the protocol still refuses it (see `task.rs`).
    let swarm_config = libp2p::swarm::Config::with_executor(MarkingExecutor)
        .with_substream_upgrade_protocol_override(Version::V1Lazy)
        .with_idle_connection_timeout(Duration::from_millis(config.idle_connection_timeout_ms));
    Ok(Swarm::new(transport, behaviour, local_peer_id, swarm_config))
}

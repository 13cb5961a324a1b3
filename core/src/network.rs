//! The transport seam: [`PeerNetwork`] sends one request to a peer and waits for one response.
//!
//! The node's libp2p host implements it over request-response streams (SPEC 3.1); the testkit
//! implements it in memory with injected faults.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use libp2p_identity::PeerId;
use serde_json::Value;

use crate::error::{ErrorCode, RepoError};

/// The protocols a node speaks besides the DHT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolKind {
    /// `<prefix>/repo/1.0.0`: repo operations (SPEC 3.2).
    Repo,
    /// `<prefix>/cluster/1.0.0`: cluster records (SPEC 3.3).
    Cluster,
    /// `<prefix>/sync/1.0.0`: catch-up of committed revisions.
    Sync,
}

impl ProtocolKind {
    /// Every protocol kind.
    pub const ALL: [ProtocolKind; 3] = [Self::Repo, Self::Cluster, Self::Sync];

    /// The protocol id under a prefix, e.g. `/db-p2p/repo/1.0.0`.
    pub fn protocol_id(self, prefix: &str) -> String {
        format!("{prefix}/{}/1.0.0", self.name())
    }

    /// The short name: `repo`, `cluster` or `sync`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Repo => "repo",
            Self::Cluster => "cluster",
            Self::Sync => "sync",
        }
    }
}

/// Why a request to a peer failed. Only [`NetworkError::Remote`] proves the peer received it; after
/// any other error the request may or may not have been processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkError {
    /// No connection to the peer could be made.
    #[error("dial to {peer} failed: {reason}")]
    DialFailed {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// No response within the deadline.
    #[error("no response from {peer} within {timeout_ms} ms")]
    Timeout {
        /// The peer.
        peer: PeerId,
        /// The deadline that passed.
        timeout_ms: u64,
    },
    /// The peer does not speak the protocol (different prefix or version).
    #[error("{peer} does not support {protocol}")]
    UnsupportedProtocol {
        /// The peer.
        peer: PeerId,
        /// The protocol id.
        protocol: String,
    },
    /// The peer answered with an error envelope.
    #[error("{peer} answered {code}: {message}")]
    Remote {
        /// The peer.
        peer: PeerId,
        /// The envelope's code.
        code: String,
        /// The envelope's message.
        message: String,
    },
    /// The stream failed mid-request (connection closed, malformed or oversize frame).
    #[error("request to {peer} failed: {reason}")]
    Stream {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// Too many outbound requests in flight on this node; nothing was sent.
    #[error("too many outbound requests in flight ({limit})")]
    Busy {
        /// The configured limit.
        limit: usize,
    },
    /// The local network host has stopped; nothing was sent.
    #[error("network host is shut down")]
    Closed,
}

impl From<NetworkError> for RepoError {
    fn from(e: NetworkError) -> Self {
        match e {
            NetworkError::Remote { code, message, .. } => RepoError::from_envelope(&code, message),
            NetworkError::Busy { .. } => RepoError::Busy(e.to_string()),
            NetworkError::Closed => RepoError::Unavailable(e.to_string()),
            other => RepoError::Unavailable(other.to_string()),
        }
    }
}

impl NetworkError {
    /// The remote error code, when the peer answered with an error envelope.
    pub fn remote_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Remote { code, .. } => ErrorCode::parse(code),
            _ => None,
        }
    }
}

/// One request, one response, to a peer on a protocol.
#[async_trait]
pub trait PeerNetwork: Send + Sync + std::fmt::Debug + 'static {
    /// This node's peer id.
    fn local_peer_id(&self) -> PeerId;

    /// Sends `request` to `peer` on `protocol` and returns its response.
    ///
    /// Guarantees: returns within `timeout` (plus scheduling slack) whatever the peer does; a
    /// response is the one `peer` itself sent (the channel is authenticated as `peer`, as libp2p's
    /// Noise handshake does), so callers may trust who answered; an
    /// error envelope in the response is returned as [`NetworkError::Remote`]. Not idempotent by
    /// itself: the protocols above make their requests safe to repeat. A request to the local peer
    /// id is an error ([`NetworkError::DialFailed`]): local work goes through local paths.
    async fn request(
        &self,
        peer: PeerId,
        protocol: ProtocolKind,
        request: Value,
        timeout: Duration,
    ) -> Result<Value, NetworkError>;

    /// [`PeerNetwork::request`] of a request shared between several sends (one record to each
    /// member of its cluster), with the same guarantees and errors. The provided implementation
    /// sends a copy; a network that writes the JSON from a reference overrides it to save that
    /// copy.
    async fn request_shared(
        &self,
        peer: PeerId,
        protocol: ProtocolKind,
        request: Arc<Value>,
        timeout: Duration,
    ) -> Result<Value, NetworkError> {
        self.request(peer, protocol, Value::clone(&request), timeout).await
    }
}

//! Keeps the connections made through bootstrap addresses open.
//!
//! libp2p closes a connection that has had no open stream for `idle_connection_timeout_ms`, and
//! either end may close it. A quiet cluster would lose its bootstrap connections every minute,
//! turn not ready and redial. So the dialling end of a bootstrap connection opens one stream on
//! `<prefix>/keep-alive/1.0.0` and both ends hold it without sending anything: a held stream keeps
//! the connection open on both sides until one of them stops or the stream is closed. Each end
//! holds at most one stream of each direction per connection; any other is dropped at once.

use std::collections::HashSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};
use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::identity::PeerId;
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound, FullyNegotiatedOutbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, Stream, StreamProtocol};

/// Keeps chosen outbound connections open (see the module documentation).
pub(crate) struct Behaviour {
    protocol: StreamProtocol,
    /// Dials whose connection is to be kept; an entry leaves when its dial fails or its
    /// connection closes.
    kept: HashSet<ConnectionId>,
}

impl Behaviour {
    pub(crate) fn new(protocol: StreamProtocol) -> Self {
        Self { protocol, kept: HashSet::new() }
    }

    /// Keeps the connection the dial `connection` makes open. Call it before dialling.
    pub(crate) fn keep(&mut self, connection: ConnectionId) {
        self.kept.insert(connection);
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::new(self.protocol.clone(), false))
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::new(self.protocol.clone(), self.kept.contains(&connection_id)))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(closed) => {
                self.kept.remove(&closed.connection_id);
            }
            FromSwarm::DialFailure(failure) => {
                self.kept.remove(&failure.connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer_id: PeerId,
        _connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// One connection's side of the keep-alive protocol.
pub(crate) struct Handler {
    protocol: StreamProtocol,
    /// This end opens the stream (it dialled a bootstrap address).
    open: bool,
    requested: bool,
    /// The stream this end opened, and whether its opening reached the peer (lazy negotiation
    /// sends the protocol id with the first flush).
    outbound: Option<(Stream, bool)>,
    /// The stream the peer opened.
    inbound: Option<Stream>,
}

impl Handler {
    fn new(protocol: StreamProtocol, open: bool) -> Self {
        Self { protocol, open, requested: false, outbound: None, inbound: None }
    }
}

/// Whether a held stream is still open: the peer never sends on it, so data is discarded and the
/// end of the stream (or an error) means it is gone.
fn still_open(stream: &mut Stream, cx: &mut Context<'_>) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
            Poll::Pending => return true,
            Poll::Ready(Ok(0) | Err(_)) => return false,
            Poll::Ready(Ok(_)) => {}
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), ())
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        if self.open && !self.requested {
            self.requested = true;
            let protocol = SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), ());
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol });
        }
        if let Some((stream, flushed)) = &mut self.outbound {
            if !*flushed {
                match Pin::new(&mut *stream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => *flushed = true,
                    Poll::Ready(Err(_)) => self.outbound = None,
                    Poll::Pending => {}
                }
            }
            if let Some((stream, true)) = &mut self.outbound
                && !still_open(stream, cx)
            {
                self.outbound = None;
            }
        }
        if let Some(stream) = &mut self.inbound
            && !still_open(stream, cx)
        {
            self.inbound = None;
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol: stream, .. })
                if self.inbound.is_none() =>
            {
                self.inbound = Some(stream);
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound { protocol: stream, .. }) => {
                self.outbound = Some((stream, false));
            }
            // A peer without the protocol: the connection lives as long as its traffic does.
            _ => {}
        }
    }
}

//! The consensus seam: how a cluster agrees on a repo operation (SPEC 4).
//!
//! Besides the [`Consensus`] trait this module defines the cluster-protocol request shape every
//! implementation understands (`{"operation": "update", "record": ClusterRecord}`, see
//! [`update_request`]) and the wall [`Clock`] consensus implementations read record expirations
//! from (injectable, so simulations can run on virtual time).

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::error::RepoError;
use crate::keynet::ClusterPeers;
use crate::model::BlockId;
use crate::record::ClusterRecord;
use crate::repo::ReadPromotion;
use crate::wire::{RepoMessage, RepoResponse};
use libp2p_identity::PeerId;

/// The `operation` of a cluster request carrying a record to vote on (SPEC 3.3).
pub const UPDATE_OPERATION: &str = "update";

/// Milliseconds since the Unix epoch, as a consensus sees them. Record expirations (SPEC 3.3) are
/// judged against this clock; timers and timeouts use `tokio::time` instead.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time in ms since the Unix epoch. Need not be monotonic (wall clocks step), but
    /// every node's clock is assumed within the deployment's allowed skew of the others.
    fn now_ms(&self) -> u64;
}

/// The system wall clock ([`crate::time::now_ms`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        crate::time::now_ms()
    }
}

/// The shared system clock, for builders that take an `Arc<dyn Clock>`.
#[must_use]
pub fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// The cluster request asking a member to vote on (or execute) `record`:
/// `{"operation": "update", "record": record}`.
#[must_use]
pub fn update_request(record: &ClusterRecord) -> Value {
    let mut map = Map::new();
    map.insert("operation".to_owned(), Value::String(UPDATE_OPERATION.to_owned()));
    map.insert("record".to_owned(), record.to_value());
    Value::Object(map)
}

/// Splits a cluster request into its `operation` name and its other fields.
///
/// Errors with [`RepoError::BadRequest`] when the request is not an object or has no string
/// `operation`.
pub fn split_request(request: Value) -> Result<(String, Map<String, Value>), RepoError> {
    let Value::Object(mut fields) = request else {
        return Err(RepoError::BadRequest("a cluster request is a JSON object".into()));
    };
    match fields.remove("operation") {
        Some(Value::String(operation)) => Ok((operation, fields)),
        _ => Err(RepoError::BadRequest("a cluster request needs a string \"operation\"".into())),
    }
}

/// Parses the `record` field of a cluster request (not verified: verification is the consensus's
/// job). Errors with [`RepoError::BadRequest`] when it is missing or not a cluster record.
pub fn take_record(fields: &mut Map<String, Value>) -> Result<ClusterRecord, RepoError> {
    let value = fields
        .remove("record")
        .ok_or_else(|| RepoError::BadRequest("the cluster request needs a \"record\"".into()))?;
    ClusterRecord::from_value(value).map_err(|e| RepoError::BadRequest(e.to_string()))
}

/// Where a consensus member reports that it is behind on a block (SPEC 4.6): it rejected a record
/// as behind, or a decided record waits for the block's missing revisions. The node answers by
/// catching the block up from its own view of the cluster (verified, SPEC 4.10), then calls
/// [`Consensus::caught_up`].
pub trait BehindSink: Send + Sync + std::fmt::Debug + 'static {
    /// Reports the block. Must not block or wait: implementations queue the work (bounded) and
    /// drop reports past their bound (the next report retries).
    fn behind(&self, block_id: &BlockId);
}

/// Agreement on pend / commit / cancel operations among a block's cluster.
#[async_trait]
pub trait Consensus: Send + Sync + std::fmt::Debug + 'static {
    /// Coordinator side: agrees on `message` (exactly one pend, commit or cancel operation on blocks
    /// that share the cluster `peers`) and applies it on the cluster.
    ///
    /// Returns the operation's result as a member reports it (a `StaleFailure` when a member
    /// reported staleness). Errors: [`RepoError::ConsensusFailed`] when the cluster did not agree
    /// (nothing applied); [`RepoError::Unavailable`] when the outcome is unknown; `Expired` when the
    /// message expired first. Safe to call again with the same message: members never apply one
    /// record twice.
    async fn execute(&self, peers: &ClusterPeers, message: &RepoMessage) -> Result<RepoResponse, RepoError>;

    /// Member side: handles a record received on the cluster protocol from `sender` (the peer the
    /// transport authenticated; any node may coordinate, so it need not be in the record's peer
    /// set) and returns this member's merged copy (its vote added). Votes are final: a
    /// re-delivery gets the same vote. A forged, tampered or expired record is refused with
    /// `bad-request` / `expired` and changes nothing.
    async fn on_update(&self, sender: PeerId, record: ClusterRecord) -> Result<ClusterRecord, RepoError>;

    /// Member side: answers one request of the cluster protocol (what the node's cluster service
    /// calls for every inbound frame). The answer is sent back as is; an `Err` is sent as the error
    /// envelope.
    ///
    /// The provided implementation understands `{"operation": "update", "record": ...}` (SPEC 3.3)
    /// and answers with [`Consensus::on_update`]'s record; any other operation, or a missing or
    /// malformed record, is [`RepoError::BadRequest`] without calling `on_update`. Implementations
    /// that define more operations (status queries for recovery, ...) override it and must keep
    /// answering `update` the same way.
    async fn handle_request(&self, sender: PeerId, request: Value) -> Result<Value, RepoError> {
        let (operation, mut fields) = split_request(request)?;
        if operation != UPDATE_OPERATION {
            let shown: String = operation.chars().take(64).collect();
            return Err(RepoError::BadRequest(format!("unknown cluster operation {shown:?}")));
        }
        let record = take_record(&mut fields)?;
        Ok(self.on_update(sender, record).await?.to_value())
    }

    /// How reads on this node may treat a read context's committed trxs (SPEC 2.1): a cluster
    /// member never writes storage on a read ([`ReadPromotion::AnswerOnly`], the provided
    /// answer); a consensus that is a single node (SPEC 4.7) answers [`ReadPromotion::Persist`].
    fn read_promotion(&self) -> ReadPromotion {
        ReadPromotion::AnswerOnly
    }

    /// Tells the consensus that verified catch-up brought `block_id` forward here, so decided
    /// records that waited for it (SPEC 4.6) can be applied now. Cheap and idempotent; the
    /// provided implementation does nothing.
    async fn caught_up(&self, _block_id: &BlockId) {}

    /// Loads persisted state and starts background work (for example recovery of reservations
    /// left by a crash). The node calls it once after building the consensus and before serving;
    /// implementations also start lazily on first use, so calling it is never required for
    /// correctness of answers, only for recovery to begin on a node that receives no request.
    /// Idempotent. The provided implementation does nothing.
    async fn start(&self) -> Result<(), RepoError> {
        Ok(())
    }

    /// Stops background work (retries, recovery). Calls in flight may fail afterwards; persisted
    /// state is kept, so a consensus built again over the same storage resumes. Idempotent. The
    /// provided implementation does nothing.
    fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::error::ErrorCode;

    #[derive(Debug)]
    struct Echo;

    #[async_trait]
    impl Consensus for Echo {
        async fn execute(&self, _peers: &ClusterPeers, _message: &RepoMessage) -> Result<RepoResponse, RepoError> {
            Err(RepoError::Internal("unused".into()))
        }

        async fn on_update(&self, _sender: PeerId, mut record: ClusterRecord) -> Result<ClusterRecord, RepoError> {
            record.extra.insert("seen".into(), json!(true));
            Ok(record)
        }
    }

    #[tokio::test]
    async fn provided_handle_request_routes_updates_and_refuses_the_rest() {
        let record = ClusterRecord::new(BTreeMap::new(), json!({"operations": [], "expiration": 1}));
        let answer = Echo.handle_request(PeerId::random(), update_request(&record)).await.unwrap();
        assert_eq!(answer["seen"], json!(true));
        assert_eq!(answer["messageHash"], json!(record.message_hash));

        for bad in [
            json!([]),
            json!({"record": record.to_value()}),
            json!({"operation": "status", "record": record.to_value()}),
            json!({"operation": "update"}),
            json!({"operation": "update", "record": 5}),
        ] {
            let e = Echo.handle_request(PeerId::random(), bad.clone()).await.unwrap_err();
            assert_eq!(e.code(), ErrorCode::BadRequest, "{bad}");
        }
        Echo.start().await.unwrap();
        Echo.shutdown();
        assert!(SystemClock.now_ms() > 1_600_000_000_000);
    }
}

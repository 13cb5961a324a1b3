//! Observability: Prometheus metrics (prometheus-client) and the `/metrics`, `/health` and
//! `/ready` HTTP endpoint.
//!
//! - `/health` is liveness: `200 {"status": "ok", "ready": bool}` for as long as the node runs.
//! - `/ready` is readiness: `200 {"status": "ready", "detail"}` when the node can serve its role
//!   (see [`crate::readiness`]), `503 {"status": "not-ready", "detail"}` otherwise.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::readiness::Readiness;

/// Most HTTP connections served at once; more wait in the accept queue.
pub const MAX_HTTP_CONNECTIONS: usize = 64;
/// A connection that has not finished its request by then is dropped.
pub const HTTP_REQUEST_TIMEOUT_MS: u64 = 5_000;

/// Labels of an operation counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// `get`, `pend`, `cancel` or `commit`.
    pub op: String,
    /// `ok`, `stale` or an error code.
    pub outcome: String,
}

/// Labels of a latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The operation.
    pub op: String,
}

/// Labels of a consensus outcome counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoundLabels {
    /// `committed`, `stale`, `rejected`, `failed`.
    pub outcome: String,
}

/// The node's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Repo operations served, by kind and outcome.
    pub repo_operations: Family<OpLabels, Counter>,
    /// Repo operation latency in seconds, by kind.
    pub repo_latency: Family<KindLabels, Histogram>,
    /// Coordinated consensus rounds, by outcome.
    pub consensus_rounds: Family<RoundLabels, Counter>,
    /// Currently connected peers.
    pub connected_peers: Gauge,
    /// Blocks in local storage (as last sampled).
    pub stored_blocks: Gauge,
    /// Bytes of local storage (as last sampled; 0 when the engine cannot tell).
    pub stored_bytes: Gauge,
    readiness: Mutex<Readiness>,
    /// `repo_operations` by op and outcome, readable (prometheus-client families cannot be listed).
    operation_totals: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
    /// `consensus_rounds` by outcome, readable.
    round_totals: Mutex<BTreeMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, registered under the `optimystic` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("optimystic");
        let repo_operations = Family::<OpLabels, Counter>::default();
        let repo_latency = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
        });
        let consensus_rounds = Family::<RoundLabels, Counter>::default();
        let connected_peers = Gauge::default();
        let stored_blocks = Gauge::default();
        let stored_bytes = Gauge::default();
        registry.register("repo_operations", "Repo operations served, by kind and outcome", repo_operations.clone());
        registry.register("repo_operation_seconds", "Repo operation latency", repo_latency.clone());
        registry.register("consensus_rounds", "Coordinated consensus rounds, by outcome", consensus_rounds.clone());
        registry.register("connected_peers", "Currently connected peers", connected_peers.clone());
        registry.register("stored_blocks", "Blocks in local storage", stored_blocks.clone());
        registry.register("stored_bytes", "Bytes of local storage", stored_bytes.clone());
        Self {
            registry,
            repo_operations,
            repo_latency,
            consensus_rounds,
            connected_peers,
            stored_blocks,
            stored_bytes,
            readiness: Mutex::new(Readiness::not_ready("starting")),
            operation_totals: Mutex::new(BTreeMap::new()),
            round_totals: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records one served repo operation. `op` and `outcome` come from small fixed sets (operation
    /// kinds, `ok` / `stale` and the error codes), so the counts stay bounded.
    pub fn record_operation(&self, op: &str, outcome: &str, elapsed: Duration) {
        self.repo_operations.get_or_create(&OpLabels { op: op.to_owned(), outcome: outcome.to_owned() }).inc();
        self.repo_latency.get_or_create(&KindLabels { op: op.to_owned() }).observe(elapsed.as_secs_f64());
        let mut totals = self.operation_totals.lock().unwrap_or_else(PoisonError::into_inner);
        let count = totals.entry(op.to_owned()).or_default().entry(outcome.to_owned()).or_default();
        *count = count.saturating_add(1);
    }

    /// Records one coordinated consensus round by outcome (`committed`, `stale` or an error code).
    pub fn record_round(&self, outcome: &str) {
        self.consensus_rounds.get_or_create(&RoundLabels { outcome: outcome.to_owned() }).inc();
        let mut totals = self.round_totals.lock().unwrap_or_else(PoisonError::into_inner);
        let count = totals.entry(outcome.to_owned()).or_default();
        *count = count.saturating_add(1);
    }

    /// Repo operations served so far, by op, then by outcome.
    pub fn operation_totals(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.operation_totals.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Coordinated consensus rounds so far, by outcome.
    pub fn round_totals(&self) -> BTreeMap<String, u64> {
        self.round_totals.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Sets what `/ready` answers (and the `ready` field of `/health`).
    pub fn set_readiness(&self, readiness: Readiness) {
        *self.readiness.lock().unwrap_or_else(PoisonError::into_inner) = readiness;
    }

    /// Whether the node can serve its role now.
    pub fn is_ready(&self) -> bool {
        self.readiness().ready
    }

    /// The readiness `/ready` reports.
    pub fn readiness(&self) -> Readiness {
        self.readiness.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct MetricsError {
    /// The address.
    pub addr: SocketAddr,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

/// A running metrics endpoint; stops when `shutdown` is sent or the handle is dropped.
#[derive(Debug)]
pub struct MetricsServer {
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` and serves `/metrics`, `/health` and `/ready` until stopped.
    pub async fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr).await.map_err(|source| MetricsError { addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| MetricsError { addr, source })?;
        let (stop, mut stopped) = watch::channel(false);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
        // Each connection is a task of the accept loop's: ending the loop ends them.
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    _ = stopped.changed() => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { continue };
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let metrics = metrics.clone();
                while connections.try_join_next().is_some() {}
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let metrics = metrics.clone();
                        async move { Ok::<_, std::convert::Infallible>(respond(&metrics, &req)) }
                    });
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(Duration::from_millis(HTTP_REQUEST_TIMEOUT_MS), conn).await;
                    drop(permit);
                });
            }
        });
        Ok(Self { local_addr, stop, task })
    }

    /// Stops accepting connections, ends the open ones and waits for the accept loop to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn respond<B>(metrics: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode())
        }
        (&Method::GET, "/health") => {
            (StatusCode::OK, "application/json", json!({"status": "ok", "ready": metrics.is_ready()}).to_string())
        }
        (&Method::GET, "/ready") => {
            let readiness = metrics.readiness();
            let (status, word) = match readiness.ready {
                true => (StatusCode::OK, "ready"),
                false => (StatusCode::SERVICE_UNAVAILABLE, "not-ready"),
            };
            (status, "application/json", json!({"status": word, "detail": readiness.detail}).to_string())
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use http_body_util::BodyExt;

    use super::*;

    async fn get(metrics: &Metrics, path: &str) -> (StatusCode, serde_json::Value) {
        let response = respond(metrics, &Request::get(path).body(()).unwrap());
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn health_is_liveness_and_ready_follows_the_readiness() {
        let metrics = Metrics::new();
        assert_eq!(get(&metrics, "/health").await, (StatusCode::OK, json!({"status": "ok", "ready": false})));
        let (status, body) = get(&metrics, "/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, json!({"status": "not-ready", "detail": "starting"}));

        metrics.set_readiness(Readiness { ready: true, detail: "1 peer connected, 1 in the routing table".into() });
        assert_eq!(get(&metrics, "/health").await, (StatusCode::OK, json!({"status": "ok", "ready": true})));
        let (status, body) = get(&metrics, "/ready").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ready");
        assert_eq!(body["detail"], "1 peer connected, 1 in the routing table");
    }

    #[test]
    fn counters_are_readable_by_label() {
        let metrics = Metrics::new();
        metrics.record_operation("get", "ok", Duration::from_millis(1));
        metrics.record_operation("get", "ok", Duration::from_millis(1));
        metrics.record_operation("commit", "stale", Duration::from_millis(1));
        metrics.record_round("committed");
        assert_eq!(metrics.operation_totals()["get"]["ok"], 2);
        assert_eq!(metrics.operation_totals()["commit"]["stale"], 1);
        assert_eq!(metrics.round_totals()["committed"], 1);
        assert!(metrics.encode().contains("optimystic_consensus_rounds_total{outcome=\"committed\"} 1"));
    }
}

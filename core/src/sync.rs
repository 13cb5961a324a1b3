//! Catch-up of lagging members over `<prefix>/sync/1.0.0`, verified (SPEC 4.10).
//!
//! A member that missed commits (it was down, partitioned, or rejected a record as behind) asks
//! the peers of its own view of the block's cluster for the committed revisions it lacks. Each
//! revision comes with its evidence (the decided pend and commit records, [`crate::evidence`]) and
//! is applied only when the revision is exactly `latest + 1`, the served `latest` carries this
//! node's own transaction (the catch-up base, SPEC 4.20), and the evidence is its execution proof:
//! approving commit votes on both records from a majority of this node's view or of P(L), the
//! peer set that fixed its newest proven revision L ([`crate::evidence::verify_trusted`]). A
//! decided record proves only a decision: recovery may have renounced it (SPEC 4.5). When the
//! evidence is no proof for this node (membership changed, or a revision has none), the revision
//! is applied only if a quorum of the view, this node excluded, reports it identically, and it
//! stays provisional. Nothing a single peer says on its own is applied: a peer serving
//! unverifiable data is logged and skipped for that catch-up.
//!
//! Requests (JSON):
//! - `{"op": "latest", "blockIds": [id]}` -> `{"latest": {id: TrxRev | null}}` (at most
//!   [`MAX_LATEST_IDS`] ids)
//! - `{"op": "revisions", "blockId": id, "afterRev": u64 | null, "limit": n, "latest"?: TrxRev,
//!   "proven"?: u64}` ->
//!   `{"latest": TrxRev | null, "entries": [{"trxId", "rev", "transform", "evidence"?}], "more": bool}`
//!   (at most [`MAX_SYNC_ENTRIES`] entries and about [`MAX_SYNC_RESPONSE_BYTES`]; only the
//!   page's revisions are read from storage). `latest` and `proven` are the asker's catch-up base:
//!   when the server holds another transaction at `latest.rev`, it answers from after `proven`.
//!   Older servers refuse the two fields (their requests take no unknown fields); the asker then
//!   repeats the request without them.
//! - `{"op": "hint", "blockIds": [id]}` -> `{"accepted": n}`: the sender holds revisions of these
//!   blocks newer than this node reported; the node queues a catch-up of each from its own view
//!   (at most [`MAX_HINT_IDS`] ids; the queue is bounded and deduplicated, so a hint is only
//!   ever a reason to look, never data). Only blocks this node is responsible for are taken (it
//!   is in its own view of the block's cluster), within a budget per sender in that view and one
//!   budget shared by every other sender (SPEC 4.10, 4.20), both per [`HINT_WINDOW_MS`]; a hint
//!   whose sender is unknown ([`SyncServer::handle`]) is not acted on.
//!
//! Replica repair ([`CatchUp::repair`]) keeps a block on its current cluster while members come
//! and go: a member pulls what its view holds beyond its own copy, then hints every member of its
//! view that answered with an older revision. New members thus receive the blocks of their
//! cluster, and while at most one member of a view changes between repairs, the evidence of
//! every revision covers a quorum of the new view (or a quorum of it reports the revision).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::canon::canon;
use crate::consensus::BehindSink;
use crate::error::RepoError;
use crate::evidence::{self, Evidence, EvidenceError, ProvenMark};
use crate::keynet::KeyNetwork;
use crate::model::{BlockId, Transform, TrxId, TrxRev};
use crate::network::{PeerNetwork, ProtocolKind};
use crate::repo::StorageRepo;

/// Most entries one `revisions` answer carries.
pub const MAX_SYNC_ENTRIES: usize = 256;
/// Transforms past this many serialized bytes go to the next page.
pub const MAX_SYNC_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// Most block ids one `latest` request may name.
pub const MAX_LATEST_IDS: usize = 1024;
/// Most pages one catch-up of a block fetches before giving up (bounds work per call).
pub const MAX_SYNC_PAGES: usize = 1024;
/// Most block ids one `hint` request may name.
pub const MAX_HINT_IDS: usize = 64;
/// Most hinted blocks the hints of one sender in the block's cluster (in this node's view) may
/// queue for catch-up per [`HINT_WINDOW_MS`] (replica repair hints a lagging member once per
/// block and round).
pub const MAX_HINTED_BLOCKS_PER_SENDER: usize = 1_024;
/// Most hinted blocks the hints of every sender outside the block's cluster together may queue
/// per [`HINT_WINDOW_MS`] (minting peer ids does not multiply it).
pub const MAX_HINTED_BLOCKS_OUTSIDERS: usize = 256;
/// The window the hint budgets are counted over.
pub const HINT_WINDOW_MS: u64 = 60_000;
/// Senders whose hint budgets are tracked at once; past it, a sender not tracked yet counts
/// against the outsiders' budget.
pub const MAX_HINT_SENDERS: usize = 1_024;

/// A sync request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", deny_unknown_fields)]
pub enum SyncRequest {
    /// The newest committed revision of each block.
    #[serde(rename_all = "camelCase")]
    Latest {
        /// The blocks.
        block_ids: Vec<BlockId>,
    },
    /// Committed revisions of one block after `after_rev`.
    #[serde(rename_all = "camelCase")]
    Revisions {
        /// The block.
        block_id: BlockId,
        /// Only revisions newer than this; `None` for all.
        #[serde(default)]
        after_rev: Option<u64>,
        /// Most entries wanted.
        limit: usize,
        /// The asker's latest revision of the block (its catch-up base, SPEC 4.20). Optional:
        /// absent from requests of older nodes, and left out towards servers that refuse it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        latest: Option<TrxRev>,
        /// The asker's newest proven revision of the block. When the server holds another
        /// transaction at `latest.rev`, it answers from after this revision instead, so the asker
        /// sees where its provisional revisions and the server's history part.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proven: Option<u64>,
    },
    /// The sender holds newer revisions of these blocks: catch up from your own view.
    #[serde(rename_all = "camelCase")]
    Hint {
        /// The blocks.
        block_ids: Vec<BlockId>,
    },
}

/// One committed revision with its transform.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncEntry {
    /// The transaction.
    pub trx_id: TrxId,
    /// The revision it produced.
    pub rev: u64,
    /// Its transform on the block.
    pub transform: Transform,
    /// The decided records proving it, when the serving peer keeps them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

/// Answer to [`SyncRequest::Latest`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatestResponse {
    /// Each requested block's latest revision (`null` if unknown here).
    pub latest: BTreeMap<BlockId, Option<TrxRev>>,
}

/// Answer to [`SyncRequest::Revisions`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RevisionsResponse {
    /// The peer's latest revision of the block.
    pub latest: Option<TrxRev>,
    /// Committed revisions after `afterRev`, ascending.
    pub entries: Vec<SyncEntry>,
    /// True when more revisions follow the last entry.
    pub more: bool,
}

/// Answer to [`SyncRequest::Hint`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintResponse {
    /// Blocks handed to the catch-up queue (0 when the node takes no hints).
    pub accepted: usize,
}

/// Serves sync requests from a local repository.
#[derive(Clone)]
pub struct SyncServer {
    local: StorageRepo,
    hints: Option<Arc<HintIntake>>,
}

/// Hint budget use over one window.
#[derive(Debug, Clone, Copy)]
struct HintWindow {
    started: tokio::time::Instant,
    used: usize,
}

impl HintWindow {
    fn new(now: tokio::time::Instant) -> Self {
        Self { started: now, used: 0 }
    }

    /// Takes one unit if fewer than `limit` were taken in the current window.
    fn take(&mut self, now: tokio::time::Instant, limit: usize) -> bool {
        if now.duration_since(self.started) >= Duration::from_millis(HINT_WINDOW_MS) {
            *self = Self::new(now);
        }
        if self.used >= limit {
            return false;
        }
        self.used += 1;
        true
    }

    /// Whether a unit is left in the current window.
    fn has_room(&self, now: tokio::time::Instant, limit: usize) -> bool {
        now.duration_since(self.started) >= Duration::from_millis(HINT_WINDOW_MS) || self.used < limit
    }
}

/// The hint budgets: one per sender in the hinted block's cluster, one shared by the others.
#[derive(Debug)]
struct HintBudgets {
    per_sender: HashMap<PeerId, HintWindow>,
    outsiders: HintWindow,
}

/// What a server does with hints: queue catch-ups of the blocks this node is responsible for,
/// within the senders' budgets.
struct HintIntake {
    sink: Arc<dyn BehindSink>,
    key_network: Arc<dyn KeyNetwork>,
    me: PeerId,
    budgets: std::sync::Mutex<HintBudgets>,
}

impl HintIntake {
    fn budgets(&self) -> std::sync::MutexGuard<'_, HintBudgets> {
        self.budgets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `sender` may still have budget (checked before each cluster lookup, so a sender
    /// whose own budget is spent costs no lookup; for any other, [`HintIntake::charge`] decides
    /// after the lookup, and the first refusal ends the hint).
    fn may_take(&self, sender: &PeerId) -> bool {
        let now = tokio::time::Instant::now();
        self.budgets().per_sender.get(sender).is_none_or(|own| own.has_room(now, MAX_HINTED_BLOCKS_PER_SENDER))
    }

    /// Takes one unit of the budget of `sender` (its own when it is `in_view`, else the shared one).
    fn charge(&self, sender: &PeerId, in_view: bool) -> bool {
        let now = tokio::time::Instant::now();
        let mut budgets = self.budgets();
        if in_view {
            if budgets.per_sender.len() >= MAX_HINT_SENDERS && !budgets.per_sender.contains_key(sender) {
                let window = Duration::from_millis(HINT_WINDOW_MS);
                budgets.per_sender.retain(|_, w| now.duration_since(w.started) < window);
            }
            if budgets.per_sender.len() < MAX_HINT_SENDERS || budgets.per_sender.contains_key(sender) {
                let own = budgets.per_sender.entry(*sender).or_insert_with(|| HintWindow::new(now));
                return own.take(now, MAX_HINTED_BLOCKS_PER_SENDER);
            }
        }
        budgets.outsiders.take(now, MAX_HINTED_BLOCKS_OUTSIDERS)
    }

    /// Queues a catch-up of each hinted block this node is responsible for, within the budgets;
    /// returns how many were queued.
    async fn take(&self, sender: &PeerId, block_ids: &[BlockId]) -> usize {
        let mut accepted = 0;
        let distinct: std::collections::BTreeSet<&BlockId> = block_ids.iter().collect();
        for block_id in distinct {
            if !self.may_take(sender) {
                tracing::debug!(%sender, "hint budget spent; the rest of the hint is dropped");
                break;
            }
            let view = match self.key_network.find_cluster(block_id).await {
                Ok(view) => view,
                Err(e) => {
                    tracing::debug!(%block_id, error = %e, "no cluster for a hinted block");
                    continue;
                }
            };
            if !view.contains_key(&self.me) {
                tracing::debug!(%sender, %block_id, "hint for a block this node is not responsible for; ignored");
                continue;
            }
            if !self.charge(sender, view.contains_key(sender)) {
                tracing::debug!(%sender, "hint budget spent; the rest of the hint is dropped");
                break;
            }
            self.sink.behind(block_id);
            accepted += 1;
        }
        accepted
    }
}

impl std::fmt::Debug for SyncServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncServer").field("takes_hints", &self.hints.is_some()).finish_non_exhaustive()
    }
}

impl SyncServer {
    /// A server over the local repository; it answers hints without acting on them.
    pub fn new(local: StorageRepo) -> Self {
        Self { local, hints: None }
    }

    /// Hands each hinted block to `sink` (the node's bounded, deduplicated catch-up queue) when
    /// this node (`me`) is in its own view (`key_network`) of the block's cluster, within the
    /// senders' budgets (see the module documentation). Hints are acted on only through
    /// [`SyncServer::handle_from`], which knows the sender.
    #[must_use]
    pub fn with_hints(mut self, sink: Arc<dyn BehindSink>, key_network: Arc<dyn KeyNetwork>, me: PeerId) -> Self {
        let budgets =
            HintBudgets { per_sender: HashMap::new(), outsiders: HintWindow::new(tokio::time::Instant::now()) };
        self.hints = Some(Arc::new(HintIntake { sink, key_network, me, budgets: std::sync::Mutex::new(budgets) }));
        self
    }

    /// Answers one request from `sender` (as the transport authenticated it): as
    /// [`SyncServer::handle`], and a hint is acted on within the sender's budget.
    pub async fn handle_from(&self, sender: PeerId, request: Value) -> Result<Value, RepoError> {
        if request.get("op").and_then(Value::as_str) != Some("hint") {
            return self.handle(request).await;
        }
        let request: SyncRequest =
            serde_json::from_value(request).map_err(|e| RepoError::BadRequest(format!("sync request: {e}")))?;
        let SyncRequest::Hint { block_ids } = request else {
            return Err(RepoError::BadRequest("sync request: expected a hint".into()));
        };
        check_hint_size(&block_ids)?;
        let accepted = match &self.hints {
            Some(hints) => hints.take(&sender, &block_ids).await,
            None => 0,
        };
        serde_json::to_value(HintResponse { accepted })
            .map_err(|e| RepoError::Internal(format!("encoding sync response: {e}")))
    }

    /// Answers one request from an unknown sender. Malformed requests are `bad-request`; nothing
    /// is ever changed. A hint is answered without being acted on (hint work is bounded per
    /// sender: [`SyncServer::handle_from`]).
    pub async fn handle(&self, request: Value) -> Result<Value, RepoError> {
        let request: SyncRequest =
            serde_json::from_value(request).map_err(|e| RepoError::BadRequest(format!("sync request: {e}")))?;
        let response = match request {
            SyncRequest::Latest { block_ids } => {
                if block_ids.len() > MAX_LATEST_IDS {
                    return Err(RepoError::BadRequest(format!(
                        "at most {MAX_LATEST_IDS} block ids per latest request, got {}",
                        block_ids.len()
                    )));
                }
                let mut latest = BTreeMap::new();
                for id in block_ids {
                    let l = self.local.storage().latest(&id).await?;
                    latest.insert(id, l);
                }
                serde_json::to_value(LatestResponse { latest })
            }
            SyncRequest::Revisions { block_id, after_rev, limit, latest, proven } => {
                let after_rev = self.base(&block_id, after_rev, latest.as_ref(), proven).await?;
                serde_json::to_value(self.revisions(&block_id, after_rev, limit).await?)
            }
            SyncRequest::Hint { block_ids } => {
                // The sender is unknown here: hint work is bounded per sender, so nothing is
                // done (the node serves hints through `handle_from`).
                check_hint_size(&block_ids)?;
                serde_json::to_value(HintResponse { accepted: 0 })
            }
        };
        response.map_err(|e| RepoError::Internal(format!("encoding sync response: {e}")))
    }

    /// Where a `revisions` answer starts (SPEC 4.20 catch-up base): after `after_rev`, or after
    /// the asker's newest `proven` revision when this node holds another transaction than the
    /// asker's `latest` at that revision.
    async fn base(
        &self,
        block_id: &BlockId,
        after_rev: Option<u64>,
        latest: Option<&TrxRev>,
        proven: Option<u64>,
    ) -> Result<Option<u64>, RepoError> {
        let Some(latest) = latest.filter(|l| l.rev > 0) else { return Ok(after_rev) };
        let here = self.local.storage().revisions(block_id, latest.rev, latest.rev).await?;
        if here.first().is_none_or(|held| held == latest) {
            return Ok(after_rev);
        }
        let proven = proven.unwrap_or(0);
        Ok(after_rev.map(|a| a.min(proven)))
    }

    async fn revisions(
        &self,
        block_id: &BlockId,
        after_rev: Option<u64>,
        limit: usize,
    ) -> Result<RevisionsResponse, RepoError> {
        let storage = self.local.storage();
        let latest = storage.latest(block_id).await?;
        let Some(latest_rev) = latest.as_ref().map(|l| l.rev) else {
            return Ok(RevisionsResponse::default());
        };
        let from = match after_rev {
            Some(r) => match r.checked_add(1) {
                Some(f) => f,
                None => return Ok(RevisionsResponse { latest, entries: Vec::new(), more: false }),
            },
            None => 0,
        };
        let limit = limit.clamp(1, MAX_SYNC_ENTRIES);
        let last = from.saturating_add(limit as u64 - 1).min(latest_rev);
        let log = storage.revisions(block_id, from, last).await?;
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut more = last < latest_rev;
        for entry in log {
            if bytes >= MAX_SYNC_RESPONSE_BYTES {
                more = true;
                break;
            }
            let committed = storage.committed(block_id, &entry.trx_id).await?.ok_or_else(|| {
                RepoError::Internal(format!("revision {} of {block_id} has no committed transform", entry.rev))
            })?;
            let evidence = self.local.evidence(block_id, entry.rev).await?;
            let sync_entry =
                SyncEntry { trx_id: entry.trx_id, rev: entry.rev, transform: committed.transform, evidence };
            bytes = bytes.saturating_add(serde_json::to_vec(&sync_entry).map_or(0, |v| v.len()));
            entries.push(sync_entry);
        }
        Ok(RevisionsResponse { latest, entries, more })
    }
}

/// Refuses a hint naming more than [`MAX_HINT_IDS`] blocks.
fn check_hint_size(block_ids: &[BlockId]) -> Result<(), RepoError> {
    if block_ids.len() > MAX_HINT_IDS {
        return Err(RepoError::BadRequest(format!(
            "at most {MAX_HINT_IDS} block ids per hint, got {}",
            block_ids.len()
        )));
    }
    Ok(())
}

/// What one catch-up of a block did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatchUpReport {
    /// Revisions applied.
    pub applied: usize,
    /// Peers whose claimed latest revision is still above this node's after the catch-up and
    /// that did not disprove their claim (they could not be reached, or their revisions could not
    /// be verified yet), with the revision claimed.
    pub unreached: Vec<(PeerId, u64)>,
}

/// What one repair of a block did ([`CatchUp::repair`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// This node is in its own view of the block's cluster (nothing is done otherwise).
    pub member: bool,
    /// Revisions this node pulled and applied.
    pub applied: usize,
    /// Members of the view that answered with an older revision and accepted a hint.
    pub hinted: Vec<PeerId>,
}

/// Why a pull from one peer stopped.
enum Pull {
    /// The peer served data that cannot be true (a revision out of order, forged or tampered
    /// evidence, a transform that does not apply): its claims are ignored for this catch-up.
    Disproved(String),
    /// The pull failed without proving anything about the peer (network, storage, no quorum to
    /// confirm an unproven revision).
    Failed(RepoError),
}

/// Fetches, verifies and applies missing committed revisions from the peers of this node's view
/// of a block's cluster.
#[derive(Clone)]
pub struct CatchUp {
    network: Arc<dyn PeerNetwork>,
    local: StorageRepo,
    key_network: Arc<dyn KeyNetwork>,
    timeout: Duration,
}

impl std::fmt::Debug for CatchUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatchUp").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl CatchUp {
    /// A catch-up client; `key_network` gives this node's view of each block's cluster (the peers
    /// asked, and what evidence must cover); `timeout` bounds each request.
    pub fn new(
        network: Arc<dyn PeerNetwork>,
        local: StorageRepo,
        key_network: Arc<dyn KeyNetwork>,
        timeout: Duration,
    ) -> Self {
        Self { network, local, key_network, timeout }
    }

    /// Asks `peers` (not this node) for their latest revision of each block. Peers that fail to
    /// answer are left out of the result.
    pub async fn latest_of(&self, peers: &[PeerId], block_ids: &[BlockId]) -> BTreeMap<PeerId, LatestResponse> {
        let request = match serde_json::to_value(SyncRequest::Latest { block_ids: block_ids.to_vec() }) {
            Ok(r) => r,
            Err(_) => return BTreeMap::new(),
        };
        let local = self.network.local_peer_id();
        let asks = peers.iter().filter(|p| **p != local).map(|peer| {
            let request = request.clone();
            async move {
                let answer = self.network.request(*peer, ProtocolKind::Sync, request, self.timeout).await;
                (*peer, answer)
            }
        });
        let mut out = BTreeMap::new();
        for (peer, answer) in futures::future::join_all(asks).await {
            match answer.map(serde_json::from_value::<LatestResponse>) {
                Ok(Ok(latest)) => {
                    out.insert(peer, latest);
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "malformed latest answer"),
                Err(e) => tracing::debug!(%peer, error = %e, "latest query failed"),
            }
        }
        out
    }

    /// Catches `block_id` up from the peers of this node's current view of its cluster. Returns
    /// the revisions applied.
    ///
    /// Errors: [`RepoError::Unavailable`] when the view cannot be found; storage errors.
    pub async fn catch_up(&self, block_id: &BlockId) -> Result<usize, RepoError> {
        let view = self
            .key_network
            .find_cluster(block_id)
            .await
            .map_err(|e| RepoError::Unavailable(format!("cluster of {block_id}: {e}")))?;
        let view: Vec<PeerId> = view.keys().copied().collect();
        self.catch_up_in(block_id, &view).await
    }

    /// Catches `block_id` up within `view` (this node's view of the block's cluster): asks the
    /// other peers of the view for their latest revision, then pulls from those ahead of this node,
    /// newest claim first, applying only verified revisions (see the module documentation), until
    /// this node holds the newest claimed revision or every such peer was tried. A peer that serves
    /// unverifiable data is skipped for this catch-up. Returns the revisions applied.
    pub async fn catch_up_in(&self, block_id: &BlockId, view: &[PeerId]) -> Result<usize, RepoError> {
        Ok(self.catch_up_report(block_id, view).await?.applied)
    }

    /// [`CatchUp::catch_up_in`], reporting also the claims still above this node's latest
    /// afterwards that no peer disproved (a quorum read cannot answer past those).
    pub async fn catch_up_report(&self, block_id: &BlockId, view: &[PeerId]) -> Result<CatchUpReport, RepoError> {
        let me = self.network.local_peer_id();
        let others: Vec<PeerId> = view.iter().copied().filter(|p| *p != me).collect();
        let answers = self.latest_of(&others, std::slice::from_ref(block_id)).await;
        self.catch_up_to_claims(block_id, view, &answers).await
    }

    /// [`CatchUp::catch_up_report`] from `latest` answers already collected (a quorum read has
    /// them: asking again could lose the one claim that matters).
    pub async fn catch_up_to_claims(
        &self,
        block_id: &BlockId,
        view: &[PeerId],
        answers: &BTreeMap<PeerId, LatestResponse>,
    ) -> Result<CatchUpReport, RepoError> {
        let mut claims: Vec<(u64, PeerId)> = answers
            .iter()
            .filter(|(peer, _)| view.contains(peer))
            .filter_map(|(peer, r)| r.latest.get(block_id).cloned().flatten().map(|l| (l.rev, *peer)))
            .collect();
        claims.sort_by(|a, b| b.cmp(a));
        let mut report = CatchUpReport::default();
        let mut disproved = Vec::new();
        for (claimed, peer) in &claims {
            if self.local_rev(block_id).await? >= *claimed {
                continue;
            }
            let mut applied = 0usize;
            let outcome = self.pull_from(block_id, *peer, view, &mut applied).await;
            report.applied += applied;
            match outcome {
                Ok(()) if self.local_rev(block_id).await? < *claimed => {
                    tracing::warn!(%block_id, %peer, claimed, "a peer claimed a revision it did not serve");
                    disproved.push(*peer);
                }
                Ok(()) => {}
                Err(Pull::Disproved(why)) => {
                    tracing::warn!(%block_id, %peer, why = %why, "a peer served unverifiable data; skipped for this catch-up");
                    disproved.push(*peer);
                }
                Err(Pull::Failed(e)) => {
                    tracing::debug!(%block_id, %peer, error = %e, "catch-up from a peer failed; trying the next");
                }
            }
        }
        let local = self.local_rev(block_id).await?;
        report.unreached = claims
            .into_iter()
            .filter(|(rev, peer)| *rev > local && !disproved.contains(peer))
            .map(|(r, p)| (p, r))
            .collect();
        Ok(report)
    }

    /// Keeps `block_id` on its current cluster: when this node is in its own view of the
    /// block's cluster, it catches up from the view (as [`CatchUp::catch_up_report`]), then
    /// sends a hint to each other member of the view that answered with an older revision (or
    /// none), so that member catches up from its own view. Members that did not answer are left
    /// for the next repair. Idempotent; costs one cluster lookup, one `latest` request per member
    /// and one hint per lagging member, plus the pulls.
    ///
    /// Errors: [`RepoError::Unavailable`] when the view cannot be found; storage errors.
    pub async fn repair(&self, block_id: &BlockId) -> Result<RepairReport, RepoError> {
        let view = self
            .key_network
            .find_cluster(block_id)
            .await
            .map_err(|e| RepoError::Unavailable(format!("cluster of {block_id}: {e}")))?;
        let me = self.network.local_peer_id();
        if !view.contains_key(&me) {
            return Ok(RepairReport::default());
        }
        let view: Vec<PeerId> = view.keys().copied().collect();
        let others: Vec<PeerId> = view.iter().copied().filter(|p| *p != me).collect();
        let answers = self.latest_of(&others, std::slice::from_ref(block_id)).await;
        let pulled = self.catch_up_to_claims(block_id, &view, &answers).await?;
        let mine = self.local_rev(block_id).await?;
        let lagging: Vec<PeerId> = answers
            .iter()
            .filter(|(_, r)| r.latest.get(block_id).cloned().flatten().map_or(0, |l| l.rev) < mine)
            .map(|(peer, _)| *peer)
            .collect();
        let hinted = self.hint(&lagging, block_id).await;
        Ok(RepairReport { member: true, applied: pulled.applied, hinted })
    }

    /// Sends a hint for `block_id` to each of `peers`; returns those that accepted it.
    async fn hint(&self, peers: &[PeerId], block_id: &BlockId) -> Vec<PeerId> {
        let Ok(request) = serde_json::to_value(SyncRequest::Hint { block_ids: vec![block_id.clone()] }) else {
            return Vec::new();
        };
        let asks = peers.iter().map(|peer| {
            let request = request.clone();
            async move { (*peer, self.network.request(*peer, ProtocolKind::Sync, request, self.timeout).await) }
        });
        let mut accepted = Vec::new();
        for (peer, answer) in futures::future::join_all(asks).await {
            match answer.map(serde_json::from_value::<HintResponse>) {
                Ok(Ok(r)) if r.accepted > 0 => accepted.push(peer),
                Ok(Ok(_)) => tracing::debug!(%block_id, %peer, "a lagging member takes no hints"),
                Ok(Err(e)) => tracing::debug!(%block_id, %peer, error = %e, "malformed hint answer"),
                Err(e) => tracing::debug!(%block_id, %peer, error = %e, "hint failed"),
            }
        }
        accepted
    }

    async fn local_rev(&self, block_id: &BlockId) -> Result<u64, RepoError> {
        Ok(self.local.storage().latest(block_id).await?.map_or(0, |l| l.rev))
    }

    /// One page of `peer`'s revisions of `block_id` after `after_rev`. `base` (this node's latest
    /// and newest proven revision, SPEC 4.20) goes along unless `legacy` is set; a server that
    /// refuses it (an older node: its requests take no unknown fields) is asked again without it,
    /// and `legacy` is set for the rest of the pull.
    async fn page(
        &self,
        peer: PeerId,
        block_id: &BlockId,
        after_rev: Option<u64>,
        base: (Option<TrxRev>, Option<u64>),
        legacy: &mut bool,
    ) -> Result<RevisionsResponse, RepoError> {
        let (latest, proven) = if *legacy { (None, None) } else { base };
        let with_base = latest.is_some() || proven.is_some();
        let request = |latest, proven| SyncRequest::Revisions {
            block_id: block_id.clone(),
            after_rev,
            limit: MAX_SYNC_ENTRIES,
            latest,
            proven,
        };
        let answer = match self.ask(peer, &request(latest, proven)).await {
            Err(RepoError::BadRequest(why)) if with_base => {
                tracing::debug!(%peer, %why, "a sync server refused the catch-up base; asking as older nodes do");
                *legacy = true;
                self.ask(peer, &request(None, None)).await?
            }
            answer => answer?,
        };
        serde_json::from_value(answer)
            .map_err(|e| RepoError::Unavailable(format!("malformed sync answer from {peer}: {e}")))
    }

    async fn ask(&self, peer: PeerId, request: &SyncRequest) -> Result<Value, RepoError> {
        let request = serde_json::to_value(request).map_err(|e| RepoError::Internal(e.to_string()))?;
        Ok(self.network.request(peer, ProtocolKind::Sync, request, self.timeout).await?)
    }

    /// Pulls and applies verified revisions from `peer`, page after page, counting them in
    /// `applied` (SPEC 4.10, 4.20):
    /// - each page starts at or below this node's latest revision, and every served revision this
    ///   node holds must carry its own transaction (the catch-up base): a revision `r` is applied
    ///   only on top of a served `r - 1` equal to its own. Where they part, nothing is applied
    ///   from this peer (the local revision may be provisional; settling it is recovery's);
    /// - a revision is applied with its evidence when the evidence is its execution proof counted
    ///   over this node's view or P(L) of its newest proven revision L (each applied proven
    ///   revision becomes the next L); otherwise only when a quorum of the view reports it
    ///   identically, and then it stays provisional (nothing marks it proven; evidence that
    ///   verifies short of proof is kept, so commit votes that reach it later can prove it).
    async fn pull_from(
        &self,
        block_id: &BlockId,
        peer: PeerId,
        view: &[PeerId],
        applied: &mut usize,
    ) -> Result<(), Pull> {
        let mut proven = self.local.newest_proven(block_id, view).await.map_err(Pull::Failed)?;
        let mut legacy = false;
        for _ in 0..MAX_SYNC_PAGES {
            let latest = self.local.storage().latest(block_id).await.map_err(|e| Pull::Failed(e.into()))?;
            let local_rev = latest.as_ref().map_or(0, |l| l.rev);
            // From the latest revision itself, so the page shows the base this node builds on.
            let after_rev = local_rev.checked_sub(1);
            let base = (latest.clone(), proven.as_ref().map(|p| p.trx_rev.rev));
            let page = self.page(peer, block_id, after_rev, base, &mut legacy).await.map_err(Pull::Failed)?;
            let mut linked = local_rev == 0;
            let mut expected = None;
            let mut progressed = false;
            let mut held = local_rev;
            for entry in &page.entries {
                if expected.is_some_and(|e| e != entry.rev) || entry.rev == 0 || entry.rev > held.saturating_add(1) {
                    return Err(Pull::Disproved(format!(
                        "it sent revision {} out of order (this node holds {local_rev})",
                        entry.rev
                    )));
                }
                expected = entry.rev.checked_add(1);
                let trx_rev = TrxRev { trx_id: entry.trx_id.clone(), rev: entry.rev };
                if entry.rev <= local_rev {
                    let here = self.local.storage().revisions(block_id, entry.rev, entry.rev).await;
                    let here = here.map_err(|e| Pull::Failed(e.into()))?;
                    if here.first() != Some(&trx_rev) {
                        tracing::warn!(
                            %block_id, %peer, rev = entry.rev, served = %entry.trx_id, held = ?here.first(),
                            "catch-up base diverges: this node holds another transaction at this revision; nothing applied on top of it"
                        );
                        return Err(Pull::Failed(RepoError::Unavailable(format!(
                            "{peer} holds {} at revision {} of {block_id}, this node another transaction",
                            entry.trx_id, entry.rev
                        ))));
                    }
                    linked |= entry.rev == local_rev;
                    continue;
                }
                if !linked {
                    return Err(Pull::Disproved(format!(
                        "it did not serve revision {local_rev}, the base of {}",
                        entry.rev
                    )));
                }
                let custody: Vec<PeerId> = proven.as_ref().map(|p| p.peers.clone()).unwrap_or_default();
                let trusted: [&[PeerId]; 2] = [view, &custody];
                let verified =
                    evidence::verify_trusted(entry.evidence.as_ref(), block_id, &trx_rev, &entry.transform, &trusted);
                let kept = match &verified {
                    Ok(peers) => Some(peers.clone()),
                    Err(e @ (EvidenceError::Missing { .. } | EvidenceError::Unproven { .. })) => {
                        if !self.agreed_by_quorum(block_id, entry, peer, view).await {
                            return Err(Pull::Failed(RepoError::Unavailable(format!(
                                "{e}, and no quorum of the view reports it"
                            ))));
                        }
                        tracing::info!(%block_id, rev = entry.rev, "applying a revision a quorum of the view reports identically; it stays provisional");
                        None
                    }
                    Err(e @ EvidenceError::Invalid { .. }) => return Err(Pull::Disproved(e.to_string())),
                };
                let evidence = entry.evidence.as_ref();
                let outcome = match (&kept, &verified) {
                    (Some(_), _) => self.local.apply_replica(block_id, &trx_rev, &entry.transform, evidence).await,
                    // Decided records naming this revision: kept, so later commit votes can prove it.
                    (None, Err(EvidenceError::Unproven { .. })) => {
                        self.local.apply_provisional(block_id, &trx_rev, &entry.transform, evidence).await
                    }
                    (None, _) => self.local.apply_provisional(block_id, &trx_rev, &entry.transform, None).await,
                };
                match outcome {
                    Ok(true) => *applied += 1,
                    Ok(false) => {}
                    Err(e @ (RepoError::InvalidTransform { .. } | RepoError::BadRequest(_))) => {
                        return Err(Pull::Disproved(e.to_string()));
                    }
                    Err(e) => return Err(Pull::Failed(e)),
                }
                progressed = true;
                if let Some(peers) = kept {
                    proven = Some(ProvenMark { trx_rev: trx_rev.clone(), peers });
                }
                held = entry.rev;
            }
            if !page.more || !progressed {
                break;
            }
        }
        Ok(())
    }

    /// Whether a quorum of `view`, this node excluded, reports `entry` identically (same trxId,
    /// rev and canonical transform); `source` already did.
    async fn agreed_by_quorum(&self, block_id: &BlockId, entry: &SyncEntry, source: PeerId, view: &[PeerId]) -> bool {
        let me = self.network.local_peer_id();
        let needed = evidence::majority(view.len());
        let Ok(wanted) = serde_json::to_value(&entry.transform).map(|v| canon(&v)) else { return false };
        let mut agreeing = usize::from(view.contains(&source));
        let askers = view.iter().copied().filter(|p| *p != me && *p != source);
        let request = SyncRequest::Revisions {
            block_id: block_id.clone(),
            after_rev: Some(entry.rev.saturating_sub(1)),
            limit: 1,
            latest: None,
            proven: None,
        };
        let asks = askers.map(|peer| self.ask(peer, &request));
        for answer in futures::future::join_all(asks).await {
            let Ok(Ok(page)) = answer.map(serde_json::from_value::<RevisionsResponse>) else { continue };
            let same = page.entries.first().is_some_and(|other| {
                other.rev == entry.rev
                    && other.trx_id == entry.trx_id
                    && serde_json::to_value(&other.transform).is_ok_and(|v| canon(&v) == wanted)
            });
            agreeing += usize::from(same);
        }
        agreeing >= needed
    }
}

//! Whole single-block transactions for people and tools: read the block's latest revision, pend the
//! transform at the next revision, commit it, and retry with backoff when another writer got there
//! first.

use std::time::Duration;

use base64::Engine as _;
use optimystic_core::model::{
    BlockGets, BlockId, CommitRequest, CommitResult, PendPolicy, PendRequest, PendResult, Transform, Transforms,
    TrxBlocks, TrxId, TrxRev,
};
use optimystic_core::{MessageOptions, Repo, RepoError};
use rand::RngCore;

/// How a transaction retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most attempts before giving up.
    pub max_attempts: u32,
    /// First backoff; doubles each attempt (with jitter) up to `max_backoff_ms`.
    pub base_backoff_ms: u64,
    /// Longest backoff.
    pub max_backoff_ms: u64,
    /// Deadline of each operation.
    pub operation_timeout_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 10, base_backoff_ms: 20, max_backoff_ms: 2_000, operation_timeout_ms: 10_000 }
    }
}

/// Why a transaction did not commit.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// A non-retryable error (bad request, invalid transform, ...). Nothing was committed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Every attempt met a newer revision or a busy cluster.
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last reason.
        last: String,
    },
}

/// A fresh transaction id: 128 random bits in base64url.
pub fn new_trx_id() -> TrxId {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    #[allow(clippy::expect_used)]
    TrxId::new(text).expect("22 ASCII characters are within the 1..=128 byte bound of a trx id")
}

/// Applies `transform` to `block_id` as one transaction and returns where it committed.
///
/// Each attempt reads the latest revision `r`, pends at `r + 1` (policy `c`), and commits at
/// `r + 1`. A stale answer or a retryable error cancels the pend and retries after a backoff.
pub async fn write_block(
    repo: &dyn Repo,
    block_id: &BlockId,
    transform: &Transform,
    policy: RetryPolicy,
) -> Result<TrxRev, TxnError> {
    let mut backoff_ms = policy.base_backoff_ms.max(1);
    let mut last = String::from("no attempt made");
    for attempt in 1..=policy.max_attempts.max(1) {
        let options = MessageOptions::expiring_in(policy.operation_timeout_ms);
        match attempt_once(repo, block_id, transform, &options).await {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(reason)) => last = reason,
            Err(e) if e.is_retryable() => last = e.to_string(),
            Err(e) => return Err(e.into()),
        }
        tracing::debug!(%block_id, attempt, reason = %last, "transaction attempt did not commit");
        if attempt < policy.max_attempts {
            let jitter = rand::random::<u64>() % backoff_ms.max(1);
            tokio::time::sleep(Duration::from_millis(backoff_ms + jitter)).await;
            backoff_ms = backoff_ms.saturating_mul(2).min(policy.max_backoff_ms.max(1));
        }
    }
    Err(TxnError::GaveUp { attempts: policy.max_attempts, last })
}

/// One attempt: `Ok(Ok(rev))` committed, `Ok(Err(reason))` stale (retry), `Err` failed.
async fn attempt_once(
    repo: &dyn Repo,
    block_id: &BlockId,
    transform: &Transform,
    options: &MessageOptions,
) -> Result<Result<TrxRev, String>, RepoError> {
    let gets = BlockGets { block_ids: vec![block_id.clone()], context: None, read_mode: None };
    let state = repo.get(&gets, options).await?;
    let latest = state.get(block_id).and_then(|r| r.state.latest.clone());
    let rev = latest.map_or(1, |l| l.rev.saturating_add(1));
    let trx_id = new_trx_id();
    let pend = PendRequest {
        trx_id: trx_id.clone(),
        rev: Some(rev),
        transforms: Transforms::single(block_id, transform),
        policy: PendPolicy::Continue,
    };
    match repo.pend(&pend, options).await? {
        PendResult::Success(_) => {}
        PendResult::Stale(stale) => return Ok(Err(stale.reason.unwrap_or_else(|| "stale".into()))),
    }
    let commit = CommitRequest {
        trx_id: trx_id.clone(),
        block_ids: vec![block_id.clone()],
        rev,
        tail_id: block_id.clone(),
        header_id: None,
    };
    let outcome = repo.commit(&commit, options).await;
    match outcome {
        Ok(CommitResult::Success(_)) => Ok(Ok(TrxRev { trx_id, rev })),
        Ok(CommitResult::Stale(stale)) => {
            cancel_quietly(repo, &trx_id, block_id).await;
            Ok(Err(stale.reason.unwrap_or_else(|| "stale".into())))
        }
        Err(e) => {
            if e.is_retryable() || matches!(e, RepoError::Expired) {
                // The outcome is unknown only for `unavailable`; a cancel of a committed trx is a no-op.
                cancel_quietly(repo, &trx_id, block_id).await;
            }
            Err(e)
        }
    }
}

async fn cancel_quietly(repo: &dyn Repo, trx_id: &TrxId, block_id: &BlockId) {
    let trx = TrxBlocks { trx_id: trx_id.clone(), block_ids: vec![block_id.clone()] };
    if let Err(e) = repo.cancel(&trx, &MessageOptions::expiring_in(5_000)).await {
        tracing::debug!(%trx_id, error = %e, "cancel after a failed commit failed; the pend expires");
    }
}

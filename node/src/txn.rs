//! Whole single-block transactions for people and tools: read the block's latest revision, pend the
//! transform at the next revision, commit it, and retry with backoff when another writer got there
//! first.

use std::time::Duration;

use base64::Engine as _;
use optimystic_core::model::{
    Block, BlockGets, BlockId, CommitRequest, CommitResult, PendPolicy, PendRequest, PendResult, Transform, Transforms,
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

/// Why a transaction did not commit, and what the caller can know about it.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// A non-retryable error (bad request, invalid transform, ...). Nothing was committed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The transform could not be built from the block's latest value. Nothing was committed.
    #[error("{0}")]
    Build(String),
    /// Every attempt met a newer revision or a busy cluster. Nothing was committed.
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last reason.
        last: String,
    },
    /// A commit was sent and no answer settled it: the transaction may or may not have committed
    /// at `rev`. It can commit nowhere else, and no other attempt was made after it.
    #[error("outcome unknown: the commit of {trx_id} at revision {rev} was sent and not confirmed: {last}")]
    Unknown {
        /// The transaction whose commit is unsettled.
        trx_id: TrxId,
        /// The only revision it can have committed at.
        rev: u64,
        /// The last reason.
        last: String,
    },
}

impl TxnError {
    /// True when the transaction certainly did not commit.
    pub fn nothing_committed(&self) -> bool {
        !matches!(self, Self::Unknown { .. })
    }
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
/// See [`write_with`]; the transform does not depend on the block's value.
pub async fn write_block(
    repo: &dyn Repo,
    block_id: &BlockId,
    transform: &Transform,
    policy: RetryPolicy,
) -> Result<TrxRev, TxnError> {
    write_with(repo, block_id, policy, |_| Ok(transform.clone())).await
}

/// Applies the transform `build` makes from the block's latest value (`None`: no such block) as
/// one transaction, exactly once, and returns where it committed.
///
/// Each attempt reads the latest revision `r`, builds the transform, pends it at `r + 1` (policy
/// `c`) and commits it at `r + 1`. A stale answer or a retryable error before the commit cancels
/// the pend and retries after a backoff with a new transaction. A commit whose answer is lost
/// (`unavailable`, `busy`, expired) is never abandoned for a new transaction, which could apply
/// the write twice: the same commit is sent again until it is confirmed (committed), refuted (the
/// revision went to another transaction; then a new attempt starts) or the attempts run out
/// ([`TxnError::Unknown`]).
pub async fn write_with<F>(
    repo: &dyn Repo,
    block_id: &BlockId,
    policy: RetryPolicy,
    mut build: F,
) -> Result<TrxRev, TxnError>
where
    F: FnMut(Option<&Block>) -> Result<Transform, String> + Send,
{
    let mut backoff_ms = policy.base_backoff_ms.max(1);
    let mut last = String::from("no attempt made");
    let mut unsettled: Option<TrxRev> = None;
    let attempts = policy.max_attempts.max(1);
    for attempt in 1..=attempts {
        let options = MessageOptions::expiring_in(policy.operation_timeout_ms);
        let outcome = match &unsettled {
            Some(sent) => settle(repo, block_id, sent, &options, Sent::Again).await?,
            None => attempt_once(repo, block_id, &mut build, &options).await?,
        };
        match outcome {
            Attempt::Committed(done) => return Ok(done),
            Attempt::Retry(reason) => {
                unsettled = None;
                last = reason;
            }
            Attempt::Unsettled(sent, reason) => {
                unsettled = Some(sent);
                last = reason;
            }
        }
        tracing::debug!(%block_id, attempt, reason = %last, unsettled = unsettled.is_some(), "transaction attempt did not commit");
        if attempt < attempts {
            let jitter = rand::random::<u64>() % backoff_ms.max(1);
            tokio::time::sleep(Duration::from_millis(backoff_ms + jitter)).await;
            backoff_ms = backoff_ms.saturating_mul(2).min(policy.max_backoff_ms.max(1));
        }
    }
    match unsettled {
        Some(sent) => Err(TxnError::Unknown { trx_id: sent.trx_id, rev: sent.rev, last }),
        None => Err(TxnError::GaveUp { attempts, last }),
    }
}

/// How one attempt ended.
enum Attempt {
    /// Committed at this revision.
    Committed(TrxRev),
    /// Nothing committed; a new attempt may start.
    Retry(String),
    /// The commit of this transaction was sent and its outcome is not known.
    Unsettled(TrxRev, String),
}

/// One attempt with a new transaction. `Err` is a non-retryable failure before any commit was
/// sent, or a commit refused outright (nothing committed either way).
async fn attempt_once<F>(
    repo: &dyn Repo,
    block_id: &BlockId,
    build: &mut F,
    options: &MessageOptions,
) -> Result<Attempt, TxnError>
where
    F: FnMut(Option<&Block>) -> Result<Transform, String> + Send,
{
    let gets = BlockGets { block_ids: vec![block_id.clone()], context: None, read_mode: None };
    let state = match repo.get(&gets, options).await {
        Ok(state) => state,
        Err(e) if e.is_retryable() || matches!(e, RepoError::Expired) => return Ok(Attempt::Retry(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    let current = state.get(block_id);
    let latest = current.and_then(|r| r.state.latest.clone());
    let transform = build(current.and_then(|r| r.block.as_ref())).map_err(TxnError::Build)?;
    let rev = latest.map_or(1, |l| l.rev.saturating_add(1));
    let trx_id = new_trx_id();
    let pend = PendRequest {
        trx_id: trx_id.clone(),
        rev: Some(rev),
        transforms: Transforms::single(block_id, &transform),
        policy: PendPolicy::Continue,
    };
    match repo.pend(&pend, options).await {
        Ok(PendResult::Success(_)) => {}
        Ok(PendResult::Stale(stale)) => return Ok(Attempt::Retry(stale.reason.unwrap_or_else(|| "stale".into()))),
        Err(e) if e.is_retryable() || matches!(e, RepoError::Expired) => {
            // No commit was sent, so this transaction cannot commit; the cancel frees its pend.
            cancel_quietly(repo, &trx_id, block_id).await;
            return Ok(Attempt::Retry(e.to_string()));
        }
        Err(e) => return Err(e.into()),
    }
    let sent = TrxRev { trx_id, rev };
    let outcome = settle(repo, block_id, &sent, options, Sent::First).await?;
    if let Attempt::Retry(_) = &outcome {
        cancel_quietly(repo, &sent.trx_id, block_id).await;
    }
    Ok(outcome)
}

/// Whether a commit is sent for the first time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sent {
    First,
    Again,
}

/// Sends the commit of `sent` and reads what its answer proves. A first commit refused outright
/// (a non-retryable error) committed nothing; after an unsettled commit only success or a stale
/// answer settles it.
async fn settle(
    repo: &dyn Repo,
    block_id: &BlockId,
    sent: &TrxRev,
    options: &MessageOptions,
    when: Sent,
) -> Result<Attempt, TxnError> {
    let commit = CommitRequest {
        trx_id: sent.trx_id.clone(),
        block_ids: vec![block_id.clone()],
        rev: sent.rev,
        tail_id: block_id.clone(),
        header_id: None,
    };
    Ok(match repo.commit(&commit, options).await {
        // Also the answer to a commit that already applied (SPEC 2 commit: idempotent).
        Ok(CommitResult::Success(_)) => Attempt::Committed(sent.clone()),
        // Another transaction holds the revision; this one can commit only there, so never will.
        Ok(CommitResult::Stale(stale)) => Attempt::Retry(stale.reason.unwrap_or_else(|| "stale".into())),
        Err(e) if when == Sent::First && !e.is_retryable() && !matches!(e, RepoError::Expired) => {
            cancel_quietly(repo, &sent.trx_id, block_id).await;
            return Err(e.into());
        }
        Err(e) => Attempt::Unsettled(sent.clone(), e.to_string()),
    })
}

async fn cancel_quietly(repo: &dyn Repo, trx_id: &TrxId, block_id: &BlockId) {
    let trx = TrxBlocks { trx_id: trx_id.clone(), block_ids: vec![block_id.clone()] };
    if let Err(e) = repo.cancel(&trx, &MessageOptions::expiring_in(5_000)).await {
        tracing::debug!(%trx_id, error = %e, "cancel of an abandoned pend failed; the pend expires");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;
    use optimystic_core::StorageRepo;
    use optimystic_core::model::{BlockOperation, GetBlockResults};
    use optimystic_storage_memory::MemoryStorage;
    use serde_json::json;

    use super::*;

    /// A repo whose first `lost` commits apply and then answer `unavailable`, like a coordinator
    /// whose answer was lost; with `apply: false` they do not apply either.
    struct LosingCommits {
        inner: StorageRepo,
        lost: AtomicU32,
        apply: bool,
        commits: AtomicU32,
    }

    impl LosingCommits {
        fn new(lost: u32, apply: bool) -> Self {
            Self {
                inner: StorageRepo::new(Arc::new(MemoryStorage::new())),
                lost: AtomicU32::new(lost),
                apply,
                commits: AtomicU32::new(0),
            }
        }
    }

    #[async_trait]
    impl Repo for LosingCommits {
        async fn get(&self, gets: &BlockGets, options: &MessageOptions) -> Result<GetBlockResults, RepoError> {
            self.inner.get(gets, options).await
        }
        async fn pend(&self, request: &PendRequest, options: &MessageOptions) -> Result<PendResult, RepoError> {
            self.inner.pend(request, options).await
        }
        async fn cancel(&self, trx: &TrxBlocks, options: &MessageOptions) -> Result<(), RepoError> {
            self.inner.cancel(trx, options).await
        }
        async fn commit(&self, request: &CommitRequest, options: &MessageOptions) -> Result<CommitResult, RepoError> {
            self.commits.fetch_add(1, Ordering::SeqCst);
            if self.lost.load(Ordering::SeqCst) > 0 {
                self.lost.fetch_sub(1, Ordering::SeqCst);
                if self.apply {
                    self.inner.commit(request, options).await?;
                }
                return Err(RepoError::Unavailable("answer lost".into()));
            }
            self.inner.commit(request, options).await
        }
    }

    fn quick() -> RetryPolicy {
        RetryPolicy { max_attempts: 4, base_backoff_ms: 1, max_backoff_ms: 2, operation_timeout_ms: 5_000 }
    }

    fn block_id() -> BlockId {
        BlockId::new("log").unwrap()
    }

    async fn create(repo: &dyn Repo) {
        let mut block = Block::new(block_id(), "log", "c");
        block.fields.insert("entries".into(), json!([]));
        let insert = Transform { insert: Some(block), ..Transform::default() };
        write_block(repo, &block_id(), &insert, quick()).await.unwrap();
    }

    fn append(value: &str) -> Transform {
        let op = BlockOperation::splice("entries", 0, 0, vec![json!(value)]);
        Transform { updates: Some(vec![op]), ..Transform::default() }
    }

    async fn entries(repo: &dyn Repo) -> serde_json::Value {
        let gets = BlockGets { block_ids: vec![block_id()], context: None, read_mode: None };
        let state = repo.get(&gets, &MessageOptions::expiring_in(5_000)).await.unwrap();
        state[&block_id()].block.as_ref().unwrap().fields["entries"].clone()
    }

    #[tokio::test]
    async fn a_lost_commit_answer_applies_the_write_once() {
        let repo = LosingCommits::new(0, true);
        create(&repo).await;
        repo.lost.store(2, Ordering::SeqCst);
        let done = write_block(&repo, &block_id(), &append("a"), quick()).await.unwrap();
        assert_eq!(done.rev, 2);
        assert_eq!(entries(&repo).await, json!(["a"]));
        assert_eq!(repo.commits.load(Ordering::SeqCst), 1 + 3, "the same commit is sent until it is confirmed");
    }

    #[tokio::test]
    async fn a_commit_never_answered_is_unknown_not_retried_elsewhere() {
        let repo = LosingCommits::new(0, false);
        create(&repo).await;
        repo.lost.store(u32::MAX, Ordering::SeqCst);
        let error = write_block(&repo, &block_id(), &append("a"), quick()).await.unwrap_err();
        match &error {
            TxnError::Unknown { rev, .. } => assert_eq!(*rev, 2),
            other => panic!("expected an unknown outcome, got {other}"),
        }
        assert!(!error.nothing_committed());
        assert!(error.to_string().starts_with("outcome unknown: "), "{error}");
    }

    #[tokio::test]
    async fn the_transform_is_built_from_the_latest_value() {
        let repo = LosingCommits::new(0, true);
        create(&repo).await;
        for value in ["a", "b"] {
            write_with(&repo, &block_id(), quick(), |block| {
                let len = block
                    .and_then(|b| b.fields.get("entries"))
                    .and_then(|e| e.as_array())
                    .map(Vec::len)
                    .ok_or_else(|| "no entries array".to_owned())?;
                let op = BlockOperation::splice("entries", len as u64, 0, vec![json!(value)]);
                Ok(Transform { updates: Some(vec![op]), ..Transform::default() })
            })
            .await
            .unwrap();
        }
        assert_eq!(entries(&repo).await, json!(["a", "b"]));
        let error = write_with(&repo, &BlockId::new("none").unwrap(), quick(), |block| match block {
            Some(_) => Ok(Transform::default()),
            None => Err("block none does not exist".to_owned()),
        })
        .await
        .unwrap_err();
        assert!(matches!(error, TxnError::Build(_)) && error.nothing_committed(), "{error}");
    }
}

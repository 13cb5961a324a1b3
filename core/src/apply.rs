//! Running one repo operation against a [`Repo`]: the step every consensus takes once an operation
//! is agreed (SPEC 4.4) and the whole of a cluster of one (SPEC 4.7).

use crate::error::RepoError;
use crate::repo::{MessageOptions, Repo};
use crate::wire::{RepoMessage, RepoOperation, RepoResponse};

/// Runs the message's single operation against `repo`, honouring the message's `expiration`
/// (an expired message gives [`RepoError::Expired`] and changes nothing).
///
/// Errors: those of the operation; [`RepoError::BadRequest`] when the message does not carry
/// exactly one operation.
pub async fn apply_operation(repo: &dyn Repo, message: &RepoMessage) -> Result<RepoResponse, RepoError> {
    let options = MessageOptions { expiration_ms: Some(message.expiration) };
    apply_with(repo, message.operation()?, &options).await
}

/// Runs one operation against `repo` with explicit options. A consensus that has already decided
/// to apply an operation passes `MessageOptions::default()` (no deadline): the decision, not the
/// local clock, governs whether it runs.
pub async fn apply_with(
    repo: &dyn Repo,
    operation: &RepoOperation,
    options: &MessageOptions,
) -> Result<RepoResponse, RepoError> {
    Ok(match operation {
        RepoOperation::Get(gets) => RepoResponse::Get(repo.get(gets, options).await?),
        RepoOperation::Pend(request) => RepoResponse::Pend(repo.pend(request, options).await?),
        RepoOperation::Cancel { trx_ref } => {
            repo.cancel(trx_ref, options).await?;
            RepoResponse::Cancel
        }
        RepoOperation::Commit(request) => RepoResponse::Commit(repo.commit(request, options).await?),
    })
}

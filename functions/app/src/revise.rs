//! Changing a stored job. Every write is conditional on the revision it was made from
//! ([`JobStore::update`]), so two writers never overwrite each other; the one that loses the
//! race re-reads the job and applies its change again to the job as it is now. The API
//! (cancel, inbox outboxes), the runner (progress, results) and the webhook deliverer (attempts)
//! all change jobs this one way, and only here is a job's `revision` set (the store's
//! condition).

use kiln_domain::Job;

use crate::{AppError, ports::JobStore};

/// How often a change is re-applied before the caller hears `Contention`. Runners write
/// progress about once a second, so a handful of rounds is plenty.
const MAX_RACES: usize = 8;

/// What a change made of the job it was handed.
pub(crate) enum Change<T> {
    /// Write the changed job, then answer `T`. The change leaves `revision` alone: [`revise`]
    /// sets it, so no change can forget to (which would only show as endless lost races).
    Write(T),
    /// Nothing to write: answer `T` with the job as it was handed over.
    Keep(T),
}

/// Applies `change` to `current` and writes the result; when another writer got there first,
/// re-reads the job and applies `change` to that, until a write lands or the change keeps the
/// job. Answers the job as stored with the change's answer, or None when the job is gone.
pub(crate) async fn revise<T>(
    store: &dyn JobStore,
    mut current: Job,
    mut change: impl FnMut(&mut Job) -> Result<Change<T>, AppError>,
) -> Result<Option<(Job, T)>, AppError> {
    for _ in 0..MAX_RACES {
        let mut next = current.clone();
        match change(&mut next)? {
            Change::Keep(answer) => return Ok(Some((current, answer))),
            Change::Write(answer) => {
                next.revision = current.revision + 1;
                if store.update(&next).await? {
                    return Ok(Some((next, answer)));
                }
            }
        }
        match store.get(&current.id).await? {
            Some(stored) => current = stored,
            None => return Ok(None),
        }
    }
    Err(AppError::Contention)
}

/// [`revise`] starting from the stored job.
pub(crate) async fn revise_stored<T>(
    store: &dyn JobStore,
    id: &kiln_domain::JobId,
    change: impl FnMut(&mut Job) -> Result<Change<T>, AppError>,
) -> Result<Option<(Job, T)>, AppError> {
    match store.get(id).await? {
        Some(job) => revise(store, job, change).await,
        None => Ok(None),
    }
}

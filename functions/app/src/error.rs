//! Errors of the use cases. The HTTP layer maps each to a status code in one place.

use kiln_domain::{IllegalTransition, InputError, JobId, JobStatus};

use crate::ports::PortError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The client sent something invalid.
    #[error(transparent)]
    Input(#[from] InputError),
    /// No credentials, or credentials that match no tenant.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// No such job for this tenant (also when it belongs to another tenant).
    #[error("no job `{0}`")]
    NotFound(String),
    /// The job has already ended.
    #[error("job {id} has already {status}")]
    AlreadyFinished { id: JobId, status: JobStatus },
    /// The Idempotency-Key was first used with another body.
    #[error("this Idempotency-Key was already used with a different request body")]
    IdempotencyMismatch,
    /// The job could not be queued; it was not accepted and submitting again is safe.
    #[error("the job queue is unavailable; the job was not accepted and submitting again is safe")]
    QueueUnavailable(#[source] PortError),
    /// The tenant has as many jobs queued or running as its limits allow.
    #[error("{limit} jobs are queued or running, the most this account may have at once; submit again when one ends")]
    QuotaExceeded { limit: u32 },
    /// The tenant has submitted as many new jobs this minute as its limits allow.
    #[error(
        "{limit} new jobs were submitted this minute, the most this account may; try again in {retry_after_secs} s"
    )]
    RateLimited { limit: u32, retry_after_secs: u64 },
    /// Writers kept racing on the same record.
    #[error("too many concurrent changes to the same job; try again")]
    Contention,
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    Transition(#[from] IllegalTransition),
}

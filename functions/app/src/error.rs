//! Errors of the use cases. The HTTP layer maps each to a status code in one place.

use kiln_domain::{IllegalTransition, InputError, JobId, JobStatus};

use crate::{limits::LimitName, ports::PortError};

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
    RateLimited { limit: u32, retry_after_secs: u64, resets_at: chrono::DateTime<chrono::Utc> },
    /// The job would take the tenant past its GPU-work units for the day.
    #[error(
        "this job costs {cost} units and {used} of this account's {limit} units for today are used; the quota resets at {resets_at} (in {retry_after_secs} s)"
    )]
    UnitsExhausted { limit: u64, used: u64, cost: u64, resets_at: chrono::DateTime<chrono::Utc>, retry_after_secs: u64 },
    /// Writers kept racing on the same record.
    #[error("too many concurrent changes to the same job; try again")]
    Contention,
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    Transition(#[from] IllegalTransition),
}

impl AppError {
    /// The stable machine-readable code clients see (`{"error": {"code": ...}}` from the API,
    /// and the inbox's `error.json`), part of the API contract.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Input(input) => input.kind.code(),
            Self::Unauthorized(_) => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::AlreadyFinished { .. } => "already_finished",
            Self::IdempotencyMismatch => "idempotency_key_reused",
            Self::QueueUnavailable(_) => "queue_unavailable",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::RateLimited { .. } => "rate_limited",
            Self::UnitsExhausted { .. } => "units_exhausted",
            Self::Contention => "contention",
            Self::Port(PortError::Unavailable { .. }) => "backend_unavailable",
            Self::Port(PortError::Corrupt { .. }) | Self::Transition(_) => "internal",
        }
    }

    /// The field (or header) the client should fix, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Input(input) => input.field.as_deref(),
            Self::Unauthorized(_) => Some("Authorization"),
            Self::NotFound(_) => Some("id"),
            Self::IdempotencyMismatch => Some("Idempotency-Key"),
            _ => None,
        }
    }

    /// What a client is told: the message, without internals for our own faults.
    pub fn client_message(&self) -> String {
        match self {
            Self::Port(PortError::Unavailable { backend, .. }) => format!("{backend} is unavailable; try again"),
            Self::Port(PortError::Corrupt { .. }) | Self::Transition(_) => "internal error".to_owned(),
            Self::Input(input) => input.message.clone(),
            other => other.to_string(),
        }
    }

    /// The tenant limit a 429 is about: its name, and when it frees up (None: when one of the
    /// tenant's jobs ends).
    pub fn exceeded_limit(&self) -> Option<(LimitName, Option<chrono::DateTime<chrono::Utc>>)> {
        match self {
            Self::QuotaExceeded { .. } => Some((LimitName::MaxActiveJobs, None)),
            Self::RateLimited { resets_at, .. } => Some((LimitName::JobsPerMinute, Some(*resets_at))),
            Self::UnitsExhausted { resets_at, .. } => Some((LimitName::UnitsPerDay, Some(*resets_at))),
            _ => None,
        }
    }

    /// Our side failed (a backend, contention, corrupt data): the same request may succeed
    /// later, and nothing about it is the client's to fix.
    pub fn is_ours(&self) -> bool {
        matches!(self, Self::QueueUnavailable(_) | Self::Contention | Self::Port(_) | Self::Transition(_))
    }
}

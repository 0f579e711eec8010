//! What the platform does with jobs, independent of where they are stored: submitting (with
//! validation, caching, dedup and idempotency), reading, listing, canceling and expiring jobs,
//! and authenticating tenants. Storage, queueing and artifact links are ports
//! ([`ports`]) with AWS implementations in `kiln-aws` and in-memory ones in [`memory`].

pub mod auth;
pub mod error;
pub mod jobs;
pub mod limits;
pub mod memory;
pub mod messages;
pub mod ports;
mod revise;
pub mod runs;
pub mod webhooks;

pub use auth::{ApiKey, Authenticator, Tenant};
pub use error::AppError;
pub use jobs::{Disposition, Jobs, JobsConfig, Submitted};
pub use limits::TenantLimits;
pub use messages::JobMessage;
pub use runs::{JobRuns, SkipReason, Start, Written};
pub use webhooks::{AttemptOutcome, AttemptRecord, Webhooks};

//! What the platform does with jobs, independent of where they are stored: submitting (with
//! validation, caching, dedup and idempotency), reading, listing, canceling and expiring jobs,
//! authenticating tenants, the runner's job records, and what follows a job's changes
//! (webhook fan-out and delivery decisions, inbox uploads and their outboxes). Storage, queueing and artifact links are ports
//! ([`ports`]) with AWS implementations in `kiln-aws` and in-memory ones in [`memory`].

pub mod auth;
pub mod catalog;
pub mod changes;
pub mod delivery;
pub mod error;
pub mod eta;
pub mod inbox;
pub mod jobs;
pub mod keys;
pub mod limits;
pub mod memory;
pub mod messages;
pub mod outbox;
pub mod ports;
mod revise;
pub mod runs;
pub mod views;
pub mod webhooks;
pub mod wiring;

pub use auth::{ApiKey, Authenticator, Tenant};
pub use error::AppError;
pub use jobs::{Disposition, Jobs, JobsConfig, Submitted};
pub use limits::TenantLimits;
pub use messages::JobMessage;
pub use runs::{JobRuns, SkipReason, Start, Written};
pub use webhooks::{AttemptOutcome, AttemptRecord, Webhooks};
pub use wiring::Ports;

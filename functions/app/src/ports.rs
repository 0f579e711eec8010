//! The ports: what the use cases need from storage, the queue and the artifact store.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kiln_domain::{CacheKey, CatalogModel, Job, JobId, JobStatus, TenantId};
use std::time::Duration;

use crate::{
    auth::Tenant,
    limits::{Charge, Charged, Counted, Window},
    messages::JobMessage,
};

/// A backend error; `source` keeps the SDK's error for the logs.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The backend could not be reached or refused the call (throttling, network, permissions).
    #[error("{backend} call failed")]
    Unavailable {
        backend: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Stored data does not decode.
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

impl PortError {
    pub fn unavailable(backend: &'static str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable { backend, source: source.into() }
    }
}

/// The pointer from a cache key to the job that renders (or rendered) it, written with a new job.
#[derive(Debug, Clone)]
pub struct CacheClaim {
    pub key: CacheKey,
    /// The job the pointer held when it was read (a failed or expired one), or None when there
    /// was none: the write succeeds only if that is still so.
    pub replaces: Option<JobId>,
}

/// An `Idempotency-Key` and the fingerprint of the body first sent with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub key: String,
    pub fingerprint: String,
    pub job_id: JobId,
}

/// What inserting a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// Another request claimed the cache key first; nothing was written.
    CacheKeyTaken,
    /// Another request claimed the idempotency key first; nothing was written.
    IdempotencyKeyTaken,
    /// Another write was in progress on one of the items (DynamoDB's `TransactionConflict`,
    /// the usual answer when a request and its retry arrive together); nothing was written.
    Conflicted,
}

/// What queue estimates read of a queued job.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedJob {
    pub id: JobId,
    pub tenant_id: TenantId,
    pub model: String,
    pub model_version: String,
    pub priority: kiln_domain::Priority,
    pub created_at: DateTime<Utc>,
    pub cost_units: u64,
    pub share_weight: Option<u32>,
}

impl QueuedJob {
    pub fn of(job: &Job) -> Self {
        Self {
            id: job.id.clone(),
            tenant_id: job.tenant_id.clone(),
            model: job.model.clone(),
            model_version: job.model_version.clone(),
            priority: job.priority,
            created_at: job.created_at,
            cost_units: job.cost_units,
            share_weight: job.share_weight,
        }
    }
}

/// What one runner reported of its capacity for a model: the ground of queue estimates.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunnerReport {
    pub runner: String,
    /// Jobs it runs at once.
    pub slots: u32,
    /// Jobs it was running (or holding for a slot) when it reported.
    pub busy: u32,
    /// GPU-work units it finished per second over its recent windows with all slots taken
    /// (None until it has been saturated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units_per_sec: Option<f64>,
    /// Its recent render time per unit of one job, in milliseconds (None before its first render).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms_per_unit: Option<f64>,
    pub at: DateTime<Utc>,
}

/// Where runners post their capacity per model, and where the API reads it.
#[async_trait]
pub trait FleetBoard: Send + Sync {
    /// Records `report` for `model` (a board key: `name@version`) and forgets the runners in `forget`; answers every report
    /// now on the board for the model.
    async fn report(
        &self,
        model: &str,
        report: &RunnerReport,
        forget: &[String],
    ) -> Result<Vec<RunnerReport>, PortError>;
    /// Every report on the board for `model`, however old.
    async fn reports(&self, model: &str) -> Result<Vec<RunnerReport>, PortError>;
}

/// One page of a tenant's jobs, newest first.
#[derive(Debug, Clone)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Pass back as `after` for the next page; None on the last page.
    pub next: Option<JobId>,
}

/// Jobs and the request keys that point at them.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Writes a new job together with its cache pointer and idempotency record, all or nothing.
    async fn insert(
        &self,
        job: &Job,
        cache: &CacheClaim,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<InsertOutcome, PortError>;

    async fn get(&self, id: &JobId) -> Result<Option<Job>, PortError>;

    /// Writes `job` if the stored copy is still at `job.revision - 1`. False when someone else
    /// changed it first (re-read and decide again).
    async fn update(&self, job: &Job) -> Result<bool, PortError>;

    /// A tenant's jobs, newest first, optionally only those in `status`.
    async fn list(
        &self,
        tenant: &TenantId,
        status: Option<JobStatus>,
        limit: u32,
        after: Option<&JobId>,
    ) -> Result<JobPage, PortError>;

    /// The job the cache key points at, if any.
    async fn cache_entry(&self, tenant: &TenantId, key: &CacheKey) -> Result<Option<JobId>, PortError>;

    async fn idempotency_entry(&self, tenant: &TenantId, key: &str) -> Result<Option<IdempotencyRecord>, PortError>;

    /// Records an idempotency key for an existing job; false when the key is already taken.
    async fn put_idempotency(&self, tenant: &TenantId, record: &IdempotencyRecord) -> Result<bool, PortError>;

    /// Removes the cache pointer and idempotency record if they still point at `job`.
    async fn release_keys(&self, job: &Job, idempotency_key: Option<&str>) -> Result<(), PortError>;

    /// The queued jobs, as much of them as queue estimates need, oldest first, at most `limit`.
    async fn queued_jobs(&self, limit: u32) -> Result<Vec<QueuedJob>, PortError>;

    /// Queued jobs whose time to live ended before `now`, oldest first.
    async fn queued_expired_by(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Job>, PortError>;

    /// How many of the tenant's jobs are queued or running, counting no further than `up_to`.
    async fn count_active(&self, tenant: &TenantId, up_to: u32) -> Result<u32, PortError>;

    /// Counts a new job against the tenant's counters, atomically: one job in `charge.minute`
    /// and `charge.units` in `charge.day`, unless either would pass its limit (then nothing is
    /// counted). Two requests racing for the last units cannot both pass.
    async fn charge(&self, tenant: &TenantId, charge: &Charge) -> Result<Charged, PortError>;

    /// Takes back the units and the job counted by a charge whose job was not accepted after all.
    async fn refund(&self, tenant: &TenantId, charge: &Charge) -> Result<(), PortError>;

    /// Takes `units` back from the tenant's count for `day` (a job that never rendered).
    async fn refund_units(&self, tenant: &TenantId, day: Window, units: u64) -> Result<(), PortError>;

    /// What the tenant's counters hold for `day` and `minute`.
    async fn counted(&self, tenant: &TenantId, day: Window, minute: Window) -> Result<Counted, PortError>;
}

/// Where jobs wait for a runner.
#[async_trait]
pub trait JobQueue: Send + Sync {
    async fn enqueue(&self, message: &JobMessage) -> Result<(), PortError>;
}

/// The models the platform serves, each with its versions (see [`kiln_domain::catalog`]).
#[async_trait]
pub trait ModelCatalog: Send + Sync {
    async fn models(&self) -> Result<Vec<CatalogModel>, PortError>;
    /// One model and the revision it was read at.
    async fn model(&self, name: &str) -> Result<Option<StoredModel>, PortError>;
    /// Writes `model` if the stored one is still at `revision` (None: there is none yet);
    /// false when someone else changed it first.
    async fn put(&self, model: &CatalogModel, revision: Option<u64>) -> Result<bool, PortError>;
}

/// A catalog entry and the revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredModel {
    pub model: CatalogModel,
    pub revision: u64,
}

/// Tenants and their API keys (stored as SHA-256 hashes, never in clear).
#[async_trait]
pub trait TenantDirectory: Send + Sync {
    async fn tenant_by_key_hash(&self, key_hash: &str) -> Result<Option<Tenant>, PortError>;
    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>, PortError>;
    async fn create_tenant(&self, tenant: &Tenant) -> Result<bool, PortError>;
    /// Stores a key of `tenant`, in one write with the check that the tenant exists; false (and
    /// nothing written) when it does not.
    async fn add_key(&self, tenant: &TenantId, key: &StoredKey) -> Result<bool, PortError>;
    /// Every key of `tenant`.
    async fn keys(&self, tenant: &TenantId) -> Result<Vec<StoredKey>, PortError>;
    /// Deletes the key with this hash if it is `tenant`'s; false when it is not (or is gone).
    async fn revoke_key(&self, tenant: &TenantId, key_hash: &str) -> Result<bool, PortError>;
    /// Sets (None: removes) a tenant's own limits; false when there is no such tenant.
    async fn set_limits(
        &self,
        tenant: &TenantId,
        limits: Option<crate::limits::TenantLimits>,
    ) -> Result<bool, PortError>;
    /// Sets (None: removes) a tenant's weight in fair share; false when there is no such tenant.
    async fn set_share_weight(&self, tenant: &TenantId, weight: Option<u32>) -> Result<bool, PortError>;
    /// Sets (None: removes) the highest priority a tenant's jobs get; false when there is no such
    /// tenant.
    async fn set_max_priority(&self, tenant: &TenantId, max: Option<kiln_domain::Priority>) -> Result<bool, PortError>;
}

/// An API key as stored: its hash (never the key), the key's last characters to tell keys
/// apart, and when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub hash: String,
    /// The key's last four characters (empty for keys made before hints were kept).
    pub hint: String,
    pub created_at: DateTime<Utc>,
}

impl StoredKey {
    /// A public name for the key (`key_` and the first 12 hex digits of its hash): listed, and
    /// what `kiln-admin keys revoke --id` takes.
    pub fn id(&self) -> String {
        key_id(&self.hash)
    }
}

/// The public name of the key with this hash (see [`StoredKey::id`]).
pub fn key_id(hash: &str) -> String {
    format!("key_{}", &hash[..hash.len().min(12)])
}

/// A time-limited download link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresignedUrl {
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

/// Download links for stored artifacts.
#[async_trait]
pub trait ArtifactLinks: Send + Sync {
    async fn presign_get(&self, key: &str, valid_for: Duration) -> Result<PresignedUrl, PortError>;
    /// An upload link: a PUT of exactly `content_length` bytes with this content type writes
    /// `key` (both headers are signed).
    async fn presign_put(
        &self,
        key: &str,
        content_type: &str,
        content_length: u64,
        valid_for: Duration,
    ) -> Result<PresignedUrl, PortError>;
}

/// A message taken from the work queue. It stays hidden from other consumers until its lease
/// ends; deleting it acknowledges it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The queue's id of the message: the same on every receive of it, different for another
    /// send of the same body.
    pub message_id: String,
    pub body: String,
    /// Identifies this receipt for [`WorkQueue::extend`], [`WorkQueue::release`] and [`WorkQueue::delete`].
    pub receipt: String,
    /// How many times the message has been received, this time included.
    pub receive_count: u32,
    /// When the message was first sent.
    pub sent_at: Option<DateTime<Utc>>,
}

/// The runner's side of the job queue.
#[async_trait]
pub trait WorkQueue: Send + Sync {
    /// Up to `max` messages, waiting at most `wait` for the first; each leased for `lease`.
    async fn receive(&self, max: u32, wait: Duration, lease: Duration) -> Result<Vec<Delivery>, PortError>;
    /// Extends a message's lease to `lease` from now (a heartbeat).
    async fn extend(&self, receipt: &str, lease: Duration) -> Result<(), PortError>;
    /// Hands a message back: visible to every consumer again after `delay` (zero: at once).
    async fn release(&self, receipt: &str, delay: Duration) -> Result<(), PortError>;
    /// Sends delivered messages again, each in its message group (the `String`), to the end of
    /// the queue and visible after `delay`, then deletes those deliveries: new messages whose
    /// receive counts start again (deferring is not a failed attempt). Up to 10 at a time (one
    /// batch each way). A message whose send failed keeps its lease and comes back when it ends;
    /// one whose delete failed is in the queue twice, which the runner's conditional start
    /// makes harmless.
    async fn requeue(&self, deliveries: &[(Delivery, String)], delay: Duration) -> Result<(), PortError>;
    /// Acknowledges a message: it is never delivered again.
    async fn delete(&self, receipt: &str) -> Result<(), PortError>;
}

/// Where artifacts are written.
#[async_trait]
pub trait ArtifactStore: Send + Sync {
    /// Writes (or overwrites) the object at `key`.
    async fn put(&self, key: &str, content_type: &str, body: bytes::Bytes) -> Result<(), PortError>;
    /// Removes the object at `key`; one that is not there is not an error.
    async fn delete(&self, key: &str) -> Result<(), PortError>;
}

/// Where webhook events wait for delivery (durably: each is delivered or dead-lettered).
#[async_trait]
pub trait WebhookQueue: Send + Sync {
    async fn send(&self, event: &kiln_domain::JobEvent) -> Result<(), PortError>;
    /// Hides a received event until `delay` from now (its next attempt); zero hands it back at
    /// once, which lets the queue's redrive move an exhausted one to the dead-letter queue.
    async fn delay(&self, receipt: &str, delay: Duration) -> Result<(), PortError>;
}

/// How one webhook endpoint (a tenant's receiver origin) has been answering lately, shared by
/// every deliverer: failures in a row, and until when its circuit is open (no attempts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointHealth {
    pub failures: u32,
    pub open_until: Option<DateTime<Utc>>,
}

/// The webhook endpoints' circuits.
#[async_trait]
pub trait EndpointCircuits: Send + Sync {
    async fn health(&self, endpoint: &str) -> Result<EndpointHealth, PortError>;
    /// Counts one more failure in a row; the count after it.
    async fn failed(&self, endpoint: &str) -> Result<u32, PortError>;
    /// Opens the circuit until `until`.
    async fn open(&self, endpoint: &str, until: DateTime<Utc>) -> Result<(), PortError>;
    /// The endpoint answered: failures back to none, circuit closed.
    async fn recovered(&self, endpoint: &str) -> Result<(), PortError>;
}

/// Sends one webhook attempt over the network (signed, guarded, timed out) and says what came
/// of it. Never fails: every problem is an [`Attempt`](kiln_webhooks::Attempt) with a failure.
#[async_trait]
pub trait WebhookTransport: Send + Sync {
    async fn deliver(&self, request: &kiln_webhooks::DeliveryRequest) -> kiln_webhooks::Attempt;
}

/// A tenant's webhook signing secrets, newest first. Older ones stay valid (and are signed with
/// too) until `expires_at`, so receivers can switch over after a rotation.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecretSet {
    /// Bumped by every write; a write succeeds only over the version it read.
    pub version: u64,
    pub secrets: Vec<StoredSecret>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredSecret {
    /// `whsec_<base64>`.
    pub value: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

#[async_trait]
pub trait SecretStore: Send + Sync {
    async fn secrets(&self, tenant: &TenantId) -> Result<Option<SecretSet>, PortError>;
    /// Writes `set` if the stored version is still `set.version - 1` (or none is stored and
    /// `set.version` is 1). False when another writer came first.
    async fn put_secrets(&self, tenant: &TenantId, set: &SecretSet) -> Result<bool, PortError>;
}

/// Reading objects and copying them inside the artifacts bucket (the S3 inbox and outbox).
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// The object's bytes, at most `limit` of them (`Err` beyond), or None when it is missing.
    async fn get(&self, key: &str, version: Option<&str>, limit: usize) -> Result<Option<bytes::Bytes>, ObjectError>;
    async fn copy(&self, from: &str, to: &str) -> Result<(), PortError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("the object is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error(transparent)]
    Port(#[from] PortError),
}

//! The ports an entry point wires, in one bundle. A deployment fills it with the AWS adapters
//! (`kiln_aws::AwsPorts`), unit tests with the in-memory ones ([`crate::memory`]). Each entry
//! point wires only the ports it uses and leaves the rest [`Unwired`]: a Lambda function then
//! links only the adapters (and so the AWS SDKs) it calls, and a use case reaching for a port
//! its function was not given fails loudly instead of touching a resource it has no grant for.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kiln_domain::{CacheKey, CatalogModel, Job, JobEvent, JobId, JobStatus, TenantId};
use std::{sync::Arc, time::Duration};

use crate::{
    auth::Tenant,
    limits::{Charge, Charged, Counted, TenantLimits, Window},
    messages::JobMessage,
    ports::{
        ArtifactLinks, ArtifactStore, CacheClaim, Delivery, EndpointCircuits, EndpointHealth, FleetBoard,
        IdempotencyRecord, InsertOutcome, JobPage, JobQueue, JobStore, ModelCatalog, ObjectError, ObjectStore,
        PortError, PresignedUrl, QueuedJob, RunnerReport, SecretSet, SecretStore, StoredKey, StoredModel,
        TenantDirectory, WebhookQueue, WorkQueue,
    },
};

/// Every port a use case may need.
#[derive(Clone)]
pub struct Ports {
    /// Jobs, cache pointers, idempotency records, rate counters.
    pub store: Arc<dyn JobStore>,
    /// Where new jobs are queued for runners.
    pub queue: Arc<dyn JobQueue>,
    /// The runner's side of the job queue.
    pub work_queue: Arc<dyn WorkQueue>,
    pub catalog: Arc<dyn ModelCatalog>,
    pub tenants: Arc<dyn TenantDirectory>,
    pub secrets: Arc<dyn SecretStore>,
    pub webhook_queue: Arc<dyn WebhookQueue>,
    /// Webhook endpoints' recent failures and open circuits.
    pub circuits: Arc<dyn EndpointCircuits>,
    pub links: Arc<dyn ArtifactLinks>,
    pub artifacts: Arc<dyn ArtifactStore>,
    pub objects: Arc<dyn ObjectStore>,
    /// Runners' capacity per model (queue estimates).
    pub fleet: Arc<dyn FleetBoard>,
}

impl Ports {
    /// Nothing wired; set the fields an entry point uses.
    pub fn unwired() -> Self {
        let unwired = Arc::new(Unwired);
        Self {
            store: unwired.clone(),
            queue: unwired.clone(),
            work_queue: unwired.clone(),
            catalog: unwired.clone(),
            tenants: unwired.clone(),
            secrets: unwired.clone(),
            webhook_queue: unwired.clone(),
            circuits: unwired.clone(),
            links: unwired.clone(),
            artifacts: unwired.clone(),
            objects: unwired.clone(),
            fleet: unwired,
        }
    }
}

/// A port its entry point did not wire: every call fails.
#[derive(Debug, Clone, Copy)]
pub struct Unwired;

fn unwired<T>() -> Result<T, PortError> {
    Err(PortError::unavailable("unwired", "this entry point was not wired with this port (a wiring bug)"))
}

#[async_trait]
impl JobStore for Unwired {
    async fn insert(&self, _: &Job, _: &CacheClaim, _: Option<&IdempotencyRecord>) -> Result<InsertOutcome, PortError> {
        unwired()
    }
    async fn get(&self, _: &JobId) -> Result<Option<Job>, PortError> {
        unwired()
    }
    async fn update(&self, _: &Job) -> Result<bool, PortError> {
        unwired()
    }
    async fn list(&self, _: &TenantId, _: Option<JobStatus>, _: u32, _: Option<&JobId>) -> Result<JobPage, PortError> {
        unwired()
    }
    async fn cache_entry(&self, _: &TenantId, _: &CacheKey) -> Result<Option<JobId>, PortError> {
        unwired()
    }
    async fn idempotency_entry(&self, _: &TenantId, _: &str) -> Result<Option<IdempotencyRecord>, PortError> {
        unwired()
    }
    async fn put_idempotency(&self, _: &TenantId, _: &IdempotencyRecord) -> Result<bool, PortError> {
        unwired()
    }
    async fn release_keys(&self, _: &Job, _: Option<&str>) -> Result<(), PortError> {
        unwired()
    }
    async fn queued_jobs(&self, _: u32) -> Result<Vec<QueuedJob>, PortError> {
        unwired()
    }
    async fn queued_expired_by(&self, _: DateTime<Utc>, _: u32) -> Result<Vec<Job>, PortError> {
        unwired()
    }
    async fn count_active(&self, _: &TenantId, _: u32) -> Result<u32, PortError> {
        unwired()
    }
    async fn charge(&self, _: &TenantId, _: &Charge) -> Result<Charged, PortError> {
        unwired()
    }
    async fn refund(&self, _: &TenantId, _: &Charge) -> Result<(), PortError> {
        unwired()
    }
    async fn refund_units(&self, _: &TenantId, _: Window, _: u64) -> Result<(), PortError> {
        unwired()
    }
    async fn counted(&self, _: &TenantId, _: Window, _: Window) -> Result<Counted, PortError> {
        unwired()
    }
}

#[async_trait]
impl FleetBoard for Unwired {
    async fn report(&self, _: &str, _: &RunnerReport, _: &[String]) -> Result<Vec<RunnerReport>, PortError> {
        unwired()
    }
    async fn reports(&self, _: &str) -> Result<Vec<RunnerReport>, PortError> {
        unwired()
    }
}

#[async_trait]
impl JobQueue for Unwired {
    async fn enqueue(&self, _: &JobMessage) -> Result<(), PortError> {
        unwired()
    }
}

#[async_trait]
impl WorkQueue for Unwired {
    async fn receive(&self, _: u32, _: Duration, _: Duration) -> Result<Vec<Delivery>, PortError> {
        unwired()
    }
    async fn extend(&self, _: &str, _: Duration) -> Result<(), PortError> {
        unwired()
    }
    async fn release(&self, _: &str, _: Duration) -> Result<(), PortError> {
        unwired()
    }
    async fn requeue(&self, _: &[(Delivery, String)], _: Duration) -> Result<(), PortError> {
        unwired()
    }
    async fn delete(&self, _: &str) -> Result<(), PortError> {
        unwired()
    }
}

#[async_trait]
impl ModelCatalog for Unwired {
    async fn models(&self) -> Result<Vec<CatalogModel>, PortError> {
        unwired()
    }
    async fn model(&self, _: &str) -> Result<Option<StoredModel>, PortError> {
        unwired()
    }
    async fn put(&self, _: &CatalogModel, _: Option<u64>) -> Result<bool, PortError> {
        unwired()
    }
}

#[async_trait]
impl TenantDirectory for Unwired {
    async fn tenant_by_key_hash(&self, _: &str) -> Result<Option<Tenant>, PortError> {
        unwired()
    }
    async fn tenant(&self, _: &TenantId) -> Result<Option<Tenant>, PortError> {
        unwired()
    }
    async fn create_tenant(&self, _: &Tenant) -> Result<bool, PortError> {
        unwired()
    }
    async fn add_key(&self, _: &TenantId, _: &StoredKey) -> Result<bool, PortError> {
        unwired()
    }
    async fn keys(&self, _: &TenantId) -> Result<Vec<StoredKey>, PortError> {
        unwired()
    }
    async fn revoke_key(&self, _: &TenantId, _: &str) -> Result<bool, PortError> {
        unwired()
    }
    async fn set_limits(&self, _: &TenantId, _: Option<TenantLimits>) -> Result<bool, PortError> {
        unwired()
    }
    async fn set_share_weight(&self, _: &TenantId, _: Option<u32>) -> Result<bool, PortError> {
        unwired()
    }
    async fn set_max_priority(&self, _: &TenantId, _: Option<kiln_domain::Priority>) -> Result<bool, PortError> {
        unwired()
    }
}

#[async_trait]
impl EndpointCircuits for Unwired {
    async fn health(&self, _: &str) -> Result<EndpointHealth, PortError> {
        unwired()
    }
    async fn failed(&self, _: &str) -> Result<u32, PortError> {
        unwired()
    }
    async fn open(&self, _: &str, _: DateTime<Utc>) -> Result<(), PortError> {
        unwired()
    }
    async fn recovered(&self, _: &str) -> Result<(), PortError> {
        unwired()
    }
}

#[async_trait]
impl SecretStore for Unwired {
    async fn secrets(&self, _: &TenantId) -> Result<Option<SecretSet>, PortError> {
        unwired()
    }
    async fn put_secrets(&self, _: &TenantId, _: &SecretSet) -> Result<bool, PortError> {
        unwired()
    }
}

#[async_trait]
impl WebhookQueue for Unwired {
    async fn send(&self, _: &JobEvent) -> Result<(), PortError> {
        unwired()
    }
    async fn delay(&self, _: &str, _: Duration) -> Result<(), PortError> {
        unwired()
    }
}

#[async_trait]
impl ArtifactLinks for Unwired {
    async fn presign_get(&self, _: &str, _: Duration) -> Result<PresignedUrl, PortError> {
        unwired()
    }
    async fn presign_put(&self, _: &str, _: &str, _: u64, _: Duration) -> Result<PresignedUrl, PortError> {
        unwired()
    }
}

#[async_trait]
impl ArtifactStore for Unwired {
    async fn put(&self, _: &str, _: &str, _: bytes::Bytes) -> Result<(), PortError> {
        unwired()
    }
    async fn delete(&self, _: &str) -> Result<(), PortError> {
        unwired()
    }
}

#[async_trait]
impl ObjectStore for Unwired {
    async fn get(&self, _: &str, _: Option<&str>, _: usize) -> Result<Option<bytes::Bytes>, ObjectError> {
        Ok(unwired()?)
    }
    async fn copy(&self, _: &str, _: &str) -> Result<(), PortError> {
        unwired()
    }
}

//! In-memory implementations of the ports, with the same conditional semantics as the AWS ones.
//! For unit tests of the use cases and for running the runner without AWS.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kiln_domain::{CacheKey, CatalogModel, Job, JobId, JobStatus, ModelSpec, TenantId};
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    auth::Tenant,
    limits::{Charge, Charged, Counted, Window},
    messages::JobMessage,
    ports::{
        ArtifactLinks, ArtifactStore, CacheClaim, Delivery, EndpointCircuits, EndpointHealth, FleetBoard,
        IdempotencyRecord, InsertOutcome, JobPage, JobQueue, JobStore, ModelCatalog, ObjectError, ObjectStore,
        PortError, PresignedUrl, QueuedJob, RunnerReport, SecretSet, SecretStore, StoredKey, StoredModel,
        TenantDirectory, WebhookQueue, WorkQueue,
    },
    wiring::Ports,
};

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Default)]
struct JobTables {
    jobs: BTreeMap<JobId, Job>,
    cache: HashMap<(TenantId, CacheKey), JobId>,
    idempotency: HashMap<(TenantId, String), IdempotencyRecord>,
    /// Jobs counted per tenant and minute window start.
    new_jobs: HashMap<(TenantId, i64), u32>,
    /// Units counted per tenant and day window start.
    units: HashMap<(TenantId, i64), u64>,
}

/// Jobs in a map.
#[derive(Default)]
pub struct MemoryJobStore {
    tables: Mutex<JobTables>,
    conflicts: AtomicUsize,
}

impl MemoryJobStore {
    /// The next `count` inserts answer `Conflicted` and write nothing, as DynamoDB does while
    /// another transaction holds one of the items.
    pub fn conflict_next(&self, count: usize) {
        self.conflicts.store(count, Ordering::SeqCst);
    }
}

#[async_trait]
impl JobStore for MemoryJobStore {
    async fn insert(
        &self,
        job: &Job,
        cache: &CacheClaim,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<InsertOutcome, PortError> {
        if self.conflicts.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Ok(InsertOutcome::Conflicted);
        }
        let mut tables = lock(&self.tables);
        let cache_slot = (job.tenant_id.clone(), cache.key.clone());
        if tables.cache.get(&cache_slot) != cache.replaces.as_ref() {
            return Ok(InsertOutcome::CacheKeyTaken);
        }
        if let Some(record) = idempotency
            && tables.idempotency.contains_key(&(job.tenant_id.clone(), record.key.clone()))
        {
            return Ok(InsertOutcome::IdempotencyKeyTaken);
        }
        if tables.jobs.contains_key(&job.id) {
            return Err(PortError::Corrupt { what: "job", detail: format!("job {} exists", job.id) });
        }
        tables.jobs.insert(job.id.clone(), job.clone());
        tables.cache.insert(cache_slot, job.id.clone());
        if let Some(record) = idempotency {
            tables.idempotency.insert((job.tenant_id.clone(), record.key.clone()), record.clone());
        }
        Ok(InsertOutcome::Inserted)
    }

    async fn get(&self, id: &JobId) -> Result<Option<Job>, PortError> {
        Ok(lock(&self.tables).jobs.get(id).cloned())
    }

    async fn update(&self, job: &Job) -> Result<bool, PortError> {
        let mut tables = lock(&self.tables);
        match tables.jobs.get_mut(&job.id) {
            Some(stored) if stored.revision + 1 == job.revision => {
                *stored = job.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn list(
        &self,
        tenant: &TenantId,
        status: Option<JobStatus>,
        limit: u32,
        after: Option<&JobId>,
    ) -> Result<JobPage, PortError> {
        let tables = lock(&self.tables);
        let mut matching = tables
            .jobs
            .values()
            .rev()
            .filter(|job| &job.tenant_id == tenant && status.is_none_or(|s| job.status == s))
            .filter(|job| after.is_none_or(|after| &job.id < after));
        let jobs: Vec<Job> = matching.by_ref().take(limit as usize).cloned().collect();
        let next = match matching.next() {
            Some(_) => jobs.last().map(|job| job.id.clone()),
            None => None,
        };
        Ok(JobPage { jobs, next })
    }

    async fn cache_entry(&self, tenant: &TenantId, key: &CacheKey) -> Result<Option<JobId>, PortError> {
        Ok(lock(&self.tables).cache.get(&(tenant.clone(), key.clone())).cloned())
    }

    async fn idempotency_entry(&self, tenant: &TenantId, key: &str) -> Result<Option<IdempotencyRecord>, PortError> {
        Ok(lock(&self.tables).idempotency.get(&(tenant.clone(), key.to_owned())).cloned())
    }

    async fn put_idempotency(&self, tenant: &TenantId, record: &IdempotencyRecord) -> Result<bool, PortError> {
        let mut tables = lock(&self.tables);
        let slot = (tenant.clone(), record.key.clone());
        if tables.idempotency.contains_key(&slot) {
            return Ok(false);
        }
        tables.idempotency.insert(slot, record.clone());
        Ok(true)
    }

    async fn release_keys(&self, job: &Job, idempotency_key: Option<&str>) -> Result<(), PortError> {
        let mut tables = lock(&self.tables);
        let cache_slot = (job.tenant_id.clone(), job.cache_key.clone());
        if tables.cache.get(&cache_slot) == Some(&job.id) {
            tables.cache.remove(&cache_slot);
        }
        if let Some(key) = idempotency_key {
            let slot = (job.tenant_id.clone(), key.to_owned());
            if tables.idempotency.get(&slot).is_some_and(|r| r.job_id == job.id) {
                tables.idempotency.remove(&slot);
            }
        }
        Ok(())
    }

    async fn queued_jobs(&self, limit: u32) -> Result<Vec<QueuedJob>, PortError> {
        let tables = lock(&self.tables);
        let mut queued: Vec<QueuedJob> =
            tables.jobs.values().filter(|job| job.status == JobStatus::Queued).map(QueuedJob::of).collect();
        queued.sort_by_key(|job| job.created_at);
        queued.truncate(limit as usize);
        Ok(queued)
    }

    async fn queued_expired_by(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Job>, PortError> {
        let tables = lock(&self.tables);
        let mut overdue: Vec<Job> = tables
            .jobs
            .values()
            .filter(|job| job.status == JobStatus::Queued && job.expires_at < now)
            .cloned()
            .collect();
        overdue.sort_by_key(|job| job.expires_at);
        overdue.truncate(limit as usize);
        Ok(overdue)
    }

    async fn count_active(&self, tenant: &TenantId, up_to: u32) -> Result<u32, PortError> {
        let tables = lock(&self.tables);
        let active = tables.jobs.values().filter(|job| &job.tenant_id == tenant && !job.status.is_terminal());
        Ok(active.take(up_to as usize).count() as u32)
    }

    async fn charge(&self, tenant: &TenantId, charge: &Charge) -> Result<Charged, PortError> {
        let mut tables = lock(&self.tables);
        let jobs = tables.new_jobs.get(&(tenant.clone(), charge.minute.start)).copied().unwrap_or(0);
        if jobs >= charge.jobs_per_minute {
            return Ok(Charged::RateLimited);
        }
        let used = tables.units.get(&(tenant.clone(), charge.day.start)).copied().unwrap_or(0);
        if used + charge.units > charge.units_per_day {
            return Ok(Charged::OutOfUnits { used });
        }
        tables.new_jobs.insert((tenant.clone(), charge.minute.start), jobs + 1);
        tables.units.insert((tenant.clone(), charge.day.start), used + charge.units);
        Ok(Charged::Counted)
    }

    async fn refund(&self, tenant: &TenantId, charge: &Charge) -> Result<(), PortError> {
        let mut tables = lock(&self.tables);
        if let Some(jobs) = tables.new_jobs.get_mut(&(tenant.clone(), charge.minute.start)) {
            *jobs = jobs.saturating_sub(1);
        }
        if let Some(units) = tables.units.get_mut(&(tenant.clone(), charge.day.start)) {
            *units = units.saturating_sub(charge.units);
        }
        Ok(())
    }

    async fn refund_units(&self, tenant: &TenantId, day: Window, units: u64) -> Result<(), PortError> {
        if let Some(counted) = lock(&self.tables).units.get_mut(&(tenant.clone(), day.start)) {
            *counted = counted.saturating_sub(units);
        }
        Ok(())
    }

    async fn counted(&self, tenant: &TenantId, day: Window, minute: Window) -> Result<Counted, PortError> {
        let tables = lock(&self.tables);
        Ok(Counted {
            units_today: tables.units.get(&(tenant.clone(), day.start)).copied().unwrap_or(0),
            jobs_this_minute: tables.new_jobs.get(&(tenant.clone(), minute.start)).copied().unwrap_or(0),
        })
    }
}

/// Runners' reports in a map, by model and runner.
#[derive(Default)]
pub struct MemoryFleet {
    reports: Mutex<HashMap<String, BTreeMap<String, RunnerReport>>>,
}

#[async_trait]
impl FleetBoard for MemoryFleet {
    async fn report(
        &self,
        model: &str,
        report: &RunnerReport,
        forget: &[String],
    ) -> Result<Vec<RunnerReport>, PortError> {
        let mut reports = lock(&self.reports);
        let board = reports.entry(model.to_owned()).or_default();
        for runner in forget {
            board.remove(runner);
        }
        board.insert(report.runner.clone(), report.clone());
        Ok(board.values().cloned().collect())
    }

    async fn reports(&self, model: &str) -> Result<Vec<RunnerReport>, PortError> {
        Ok(lock(&self.reports).get(model).map(|board| board.values().cloned().collect()).unwrap_or_default())
    }
}

/// A queue that keeps what it was sent, and can be told to fail.
#[derive(Default)]
pub struct MemoryQueue {
    pub sent: Mutex<Vec<JobMessage>>,
    pub failing: AtomicBool,
}

impl MemoryQueue {
    pub fn sent(&self) -> Vec<JobMessage> {
        lock(&self.sent).clone()
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }
}

#[async_trait]
impl JobQueue for MemoryQueue {
    async fn enqueue(&self, message: &JobMessage) -> Result<(), PortError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(PortError::unavailable("memory queue", "the queue is set to fail"));
        }
        lock(&self.sent).push(message.clone());
        Ok(())
    }
}

/// A fixed list of models.
#[derive(Default)]
pub struct MemoryCatalog {
    models: Mutex<Vec<(CatalogModel, u64)>>,
}

impl MemoryCatalog {
    /// Each model new, with its one version taking every request.
    pub fn with(models: Vec<ModelSpec>) -> Self {
        let models = models.into_iter().map(|spec| (CatalogModel::new(spec, Utc::now()), 1)).collect();
        Self { models: Mutex::new(models) }
    }
}

#[async_trait]
impl ModelCatalog for MemoryCatalog {
    async fn models(&self) -> Result<Vec<CatalogModel>, PortError> {
        Ok(lock(&self.models).iter().map(|(model, _)| model.clone()).collect())
    }

    async fn model(&self, name: &str) -> Result<Option<StoredModel>, PortError> {
        let models = lock(&self.models);
        let found = models.iter().find(|(model, _)| model.name == name);
        Ok(found.map(|(model, revision)| StoredModel { model: model.clone(), revision: *revision }))
    }

    async fn put(&self, model: &CatalogModel, revision: Option<u64>) -> Result<bool, PortError> {
        let mut models = lock(&self.models);
        let stored = models.iter().position(|(m, _)| m.name == model.name);
        match (stored, revision) {
            (None, None) => models.push((model.clone(), 1)),
            (Some(i), Some(revision)) if models[i].1 == revision => models[i] = (model.clone(), revision + 1),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Tenants and key hashes in maps.
#[derive(Default)]
pub struct MemoryTenants {
    tenants: Mutex<HashMap<TenantId, Tenant>>,
    keys: Mutex<HashMap<String, (TenantId, StoredKey)>>,
}

#[async_trait]
impl TenantDirectory for MemoryTenants {
    async fn tenant_by_key_hash(&self, key_hash: &str) -> Result<Option<Tenant>, PortError> {
        let id = lock(&self.keys).get(key_hash).map(|(id, _)| id.clone());
        Ok(id.and_then(|id| lock(&self.tenants).get(&id).cloned()))
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>, PortError> {
        Ok(lock(&self.tenants).get(id).cloned())
    }

    async fn create_tenant(&self, tenant: &Tenant) -> Result<bool, PortError> {
        let mut tenants = lock(&self.tenants);
        if tenants.contains_key(&tenant.id) {
            return Ok(false);
        }
        tenants.insert(tenant.id.clone(), tenant.clone());
        Ok(true)
    }

    async fn add_key(&self, tenant: &TenantId, key: &StoredKey) -> Result<bool, PortError> {
        if !lock(&self.tenants).contains_key(tenant) {
            return Ok(false);
        }
        lock(&self.keys).insert(key.hash.clone(), (tenant.clone(), key.clone()));
        Ok(true)
    }

    async fn keys(&self, tenant: &TenantId) -> Result<Vec<StoredKey>, PortError> {
        Ok(lock(&self.keys).values().filter(|(owner, _)| owner == tenant).map(|(_, key)| key.clone()).collect())
    }

    async fn revoke_key(&self, tenant: &TenantId, key_hash: &str) -> Result<bool, PortError> {
        let mut keys = lock(&self.keys);
        if keys.get(key_hash).is_none_or(|(owner, _)| owner != tenant) {
            return Ok(false);
        }
        Ok(keys.remove(key_hash).is_some())
    }

    async fn set_limits(
        &self,
        tenant: &TenantId,
        limits: Option<crate::limits::TenantLimits>,
    ) -> Result<bool, PortError> {
        Ok(lock(&self.tenants).get_mut(tenant).map(|stored| stored.limits = limits).is_some())
    }

    async fn set_share_weight(&self, tenant: &TenantId, weight: Option<u32>) -> Result<bool, PortError> {
        Ok(lock(&self.tenants).get_mut(tenant).map(|stored| stored.share_weight = weight).is_some())
    }

    async fn set_max_priority(&self, tenant: &TenantId, max: Option<kiln_domain::Priority>) -> Result<bool, PortError> {
        Ok(lock(&self.tenants).get_mut(tenant).map(|stored| stored.max_priority = max).is_some())
    }
}

/// Webhook endpoints' circuits in memory.
#[derive(Default)]
pub struct MemoryCircuits {
    endpoints: Mutex<HashMap<String, EndpointHealth>>,
}

#[async_trait]
impl EndpointCircuits for MemoryCircuits {
    async fn health(&self, endpoint: &str) -> Result<EndpointHealth, PortError> {
        Ok(lock(&self.endpoints).get(endpoint).copied().unwrap_or_default())
    }

    async fn failed(&self, endpoint: &str) -> Result<u32, PortError> {
        let mut endpoints = lock(&self.endpoints);
        let health = endpoints.entry(endpoint.to_owned()).or_default();
        health.failures += 1;
        Ok(health.failures)
    }

    async fn open(&self, endpoint: &str, until: DateTime<Utc>) -> Result<(), PortError> {
        lock(&self.endpoints).entry(endpoint.to_owned()).or_default().open_until = Some(until);
        Ok(())
    }

    async fn recovered(&self, endpoint: &str) -> Result<(), PortError> {
        lock(&self.endpoints).remove(endpoint);
        Ok(())
    }
}

/// Links of the form `memory://<key>?expires=<unix>`.
#[derive(Default)]
pub struct MemoryLinks;

#[async_trait]
impl ArtifactLinks for MemoryLinks {
    async fn presign_get(&self, key: &str, valid_for: Duration) -> Result<PresignedUrl, PortError> {
        let expires_at = Utc::now() + chrono::Duration::from_std(valid_for).unwrap_or_default();
        Ok(PresignedUrl { url: format!("memory://{key}?expires={}", expires_at.timestamp()), expires_at })
    }

    async fn presign_put(
        &self,
        key: &str,
        _content_type: &str,
        _content_length: u64,
        valid_for: Duration,
    ) -> Result<PresignedUrl, PortError> {
        self.presign_get(key, valid_for).await
    }
}

struct QueuedMessage {
    id: String,
    body: String,
    receive_count: u32,
    visible_at: Instant,
}

/// A work queue in memory, with leases, receive counts and delayed release like SQS's (leases
/// are not enforced: a leased message comes back only when released).
#[derive(Default)]
pub struct MemoryWorkQueue {
    waiting: Mutex<VecDeque<QueuedMessage>>,
    leased: Mutex<HashMap<String, QueuedMessage>>,
    deleted: AtomicUsize,
    next_receipt: AtomicUsize,
    next_id: AtomicUsize,
}

impl MemoryWorkQueue {
    pub fn push(&self, body: impl Into<String>) {
        let id = format!("m{}", self.next_id.fetch_add(1, Ordering::SeqCst));
        let message = QueuedMessage { id, body: body.into(), receive_count: 0, visible_at: Instant::now() };
        lock(&self.waiting).push_back(message);
    }

    /// Messages not yet deleted (waiting or leased).
    pub fn outstanding(&self) -> usize {
        lock(&self.waiting).len() + lock(&self.leased).len()
    }

    pub fn deleted(&self) -> usize {
        self.deleted.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl WorkQueue for MemoryWorkQueue {
    async fn receive(&self, max: u32, wait: Duration, _lease: Duration) -> Result<Vec<Delivery>, PortError> {
        let deadline = Instant::now() + wait;
        loop {
            let mut taken = Vec::new();
            {
                let mut waiting = lock(&self.waiting);
                let now = Instant::now();
                while taken.len() < max as usize {
                    let Some(index) = waiting.iter().position(|m| m.visible_at <= now) else { break };
                    let mut message = waiting.remove(index).expect("index from position");
                    message.receive_count += 1;
                    let receipt = format!("r{}", self.next_receipt.fetch_add(1, Ordering::SeqCst));
                    taken.push(Delivery {
                        message_id: message.id.clone(),
                        body: message.body.clone(),
                        receipt: receipt.clone(),
                        receive_count: message.receive_count,
                        sent_at: None,
                    });
                    lock(&self.leased).insert(receipt, message);
                }
            }
            if !taken.is_empty() || Instant::now() >= deadline {
                return Ok(taken);
            }
            tokio::time::sleep(Duration::from_millis(5).min(deadline - Instant::now())).await;
        }
    }

    async fn extend(&self, _receipt: &str, _lease: Duration) -> Result<(), PortError> {
        Ok(())
    }

    async fn release(&self, receipt: &str, delay: Duration) -> Result<(), PortError> {
        if let Some(mut message) = lock(&self.leased).remove(receipt) {
            message.visible_at = Instant::now() + delay;
            lock(&self.waiting).push_back(message);
        }
        Ok(())
    }

    async fn delete(&self, receipt: &str) -> Result<(), PortError> {
        if lock(&self.leased).remove(receipt).is_some() {
            self.deleted.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn requeue(&self, deliveries: &[(Delivery, String)], delay: Duration) -> Result<(), PortError> {
        for (delivery, _group) in deliveries {
            if lock(&self.leased).remove(&delivery.receipt).is_some() {
                let id = format!("m{}", self.next_id.fetch_add(1, Ordering::SeqCst));
                let visible_at = Instant::now() + delay;
                let message = QueuedMessage { id, body: delivery.body.clone(), receive_count: 0, visible_at };
                lock(&self.waiting).push_back(message);
            }
        }
        Ok(())
    }
}

/// Artifacts (and any other objects of the bucket, such as inbox uploads) in a map.
#[derive(Default)]
pub struct MemoryArtifacts {
    objects: Mutex<HashMap<String, (String, bytes::Bytes)>>,
    failing: AtomicBool,
}

impl MemoryArtifacts {
    /// The content type and body stored at `key`.
    pub fn get(&self, key: &str) -> Option<(String, bytes::Bytes)> {
        lock(&self.objects).get(key).cloned()
    }

    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = lock(&self.objects).keys().cloned().collect();
        keys.sort();
        keys
    }

    /// While set, every write and copy fails as an unreachable S3 would.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), PortError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(PortError::unavailable("s3", "the object store is unavailable (test)"));
        }
        Ok(())
    }
}

#[async_trait]
impl ArtifactStore for MemoryArtifacts {
    async fn put(&self, key: &str, content_type: &str, body: bytes::Bytes) -> Result<(), PortError> {
        self.check()?;
        lock(&self.objects).insert(key.to_owned(), (content_type.to_owned(), body));
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), PortError> {
        self.check()?;
        lock(&self.objects).remove(key);
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for MemoryArtifacts {
    async fn get(&self, key: &str, _version: Option<&str>, limit: usize) -> Result<Option<bytes::Bytes>, ObjectError> {
        self.check()?;
        match lock(&self.objects).get(key) {
            Some((_, body)) if body.len() > limit => Err(ObjectError::TooLarge { limit }),
            Some((_, body)) => Ok(Some(body.clone())),
            None => Ok(None),
        }
    }

    async fn copy(&self, from: &str, to: &str) -> Result<(), PortError> {
        self.check()?;
        let mut objects = lock(&self.objects);
        let object =
            objects.get(from).cloned().ok_or_else(|| PortError::unavailable("s3", format!("no object {from}")))?;
        objects.insert(to.to_owned(), object);
        Ok(())
    }
}

/// The webhook queue: what was sent, and the delays set on received events.
#[derive(Default)]
pub struct MemoryWebhookQueue {
    sent: Mutex<Vec<kiln_domain::JobEvent>>,
    delays: Mutex<Vec<(String, Duration)>>,
    failing: AtomicBool,
}

impl MemoryWebhookQueue {
    pub fn sent(&self) -> Vec<kiln_domain::JobEvent> {
        lock(&self.sent).clone()
    }

    /// `(receipt, delay)` for every [`WebhookQueue::delay`] call, in order.
    pub fn delays(&self) -> Vec<(String, Duration)> {
        lock(&self.delays).clone()
    }

    /// While set, sends fail as an unreachable SQS would.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }
}

#[async_trait]
impl WebhookQueue for MemoryWebhookQueue {
    async fn send(&self, event: &kiln_domain::JobEvent) -> Result<(), PortError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(PortError::unavailable("sqs", "the webhook queue is unavailable (test)"));
        }
        lock(&self.sent).push(event.clone());
        Ok(())
    }

    async fn delay(&self, receipt: &str, delay: Duration) -> Result<(), PortError> {
        lock(&self.delays).push((receipt.to_owned(), delay));
        Ok(())
    }
}

/// Tenants' webhook secrets in a map, with the same versioned writes as the table.
#[derive(Default)]
pub struct MemorySecrets {
    sets: Mutex<HashMap<TenantId, SecretSet>>,
}

#[async_trait]
impl SecretStore for MemorySecrets {
    async fn secrets(&self, tenant: &TenantId) -> Result<Option<SecretSet>, PortError> {
        Ok(lock(&self.sets).get(tenant).cloned())
    }

    async fn put_secrets(&self, tenant: &TenantId, set: &SecretSet) -> Result<bool, PortError> {
        let mut sets = lock(&self.sets);
        let stored = sets.get(tenant).map_or(0, |s| s.version);
        if stored + 1 != set.version {
            return Ok(false);
        }
        sets.insert(tenant.clone(), set.clone());
        Ok(true)
    }
}

/// One of each in-memory port, kept typed so tests can look inside, and wired as [`Ports`].
#[derive(Clone, Default)]
pub struct MemoryPorts {
    pub store: Arc<MemoryJobStore>,
    pub queue: Arc<MemoryQueue>,
    pub work_queue: Arc<MemoryWorkQueue>,
    pub catalog: Arc<MemoryCatalog>,
    pub tenants: Arc<MemoryTenants>,
    pub secrets: Arc<MemorySecrets>,
    pub webhook_queue: Arc<MemoryWebhookQueue>,
    pub circuits: Arc<MemoryCircuits>,
    pub links: Arc<MemoryLinks>,
    pub artifacts: Arc<MemoryArtifacts>,
    pub fleet: Arc<MemoryFleet>,
}

impl MemoryPorts {
    /// In-memory ports serving `models`.
    pub fn with_models(models: Vec<ModelSpec>) -> Self {
        Self { catalog: Arc::new(MemoryCatalog::with(models)), ..Self::default() }
    }

    /// Every port wired to these.
    pub fn ports(&self) -> Ports {
        Ports {
            store: self.store.clone(),
            queue: self.queue.clone(),
            work_queue: self.work_queue.clone(),
            catalog: self.catalog.clone(),
            tenants: self.tenants.clone(),
            secrets: self.secrets.clone(),
            webhook_queue: self.webhook_queue.clone(),
            circuits: self.circuits.clone(),
            links: self.links.clone(),
            artifacts: self.artifacts.clone(),
            objects: self.artifacts.clone(),
            fleet: self.fleet.clone(),
        }
    }
}

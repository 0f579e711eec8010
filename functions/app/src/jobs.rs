//! The job use cases.

use chrono::{DateTime, Utc};
use kiln_domain::{
    CacheKey, CatalogModel, InputError, InputErrorKind, Job, JobErrorCode, JobId, JobStatus, ModelSpec, Priority,
    Quality, SHADOW_TENANT, Submission, Subscription, TenantId, Webhook, WebhookPolicy,
};
use rand::Rng;
use sha2::{Digest, Sha256};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tracing::{info, warn};

use crate::{
    auth::Tenant,
    error::AppError,
    eta::{self, Estimate},
    limits::{Charge, Charged, TenantLimits, Window},
    messages::JobMessage,
    ports::{
        ArtifactLinks, CacheClaim, FleetBoard, IdempotencyRecord, InsertOutcome, JobPage, JobQueue, JobStore,
        ModelCatalog, ObjectError, ObjectStore, PresignedUrl, QueuedJob, RunnerReport,
    },
    revise::{Change, revise},
    wiring::Ports,
};

/// Settings of the job use cases.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// A queued job that no runner has started within this expires.
    pub queued_ttl: chrono::Duration,
    /// How long an output's download link stays valid.
    pub link_ttl: Duration,
    /// Which webhook URLs are accepted.
    pub webhook_policy: WebhookPolicy,
    /// How long the model list is reused before it is read again.
    pub catalog_ttl: Duration,
    /// Limits of tenants that have none of their own.
    pub default_limits: TenantLimits,
    /// How long outputs are kept after their job ends (the bucket's lifecycle on `jobs/`):
    /// recorded on each job, it sets the outputs' `expires_at`, the purge time of the job's
    /// records, and whether a cached result can still be served.
    pub output_retention: Duration,
    /// Jobs waiting per GPU slot of a model version over which `quality: auto` requests get
    /// the model's fast preset.
    pub degrade_backlog_per_slot: f64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            queued_ttl: chrono::Duration::hours(1),
            link_ttl: Duration::from_secs(3600),
            webhook_policy: WebhookPolicy::default(),
            catalog_ttl: Duration::from_secs(30),
            default_limits: TenantLimits::default(),
            output_retention: Duration::from_secs(30 * 24 * 3600),
            degrade_backlog_per_slot: 8.0,
        }
    }
}

/// How a submission was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// A new job was queued.
    Created,
    /// An identical request already succeeded: its result is returned, nothing renders.
    Cached,
    /// An identical request is queued or running: that job is returned.
    Deduplicated,
    /// The same Idempotency-Key and body were sent before: the first job is returned.
    Replayed,
}

#[derive(Debug, Clone)]
pub struct Submitted {
    pub job: Job,
    pub disposition: Disposition,
}

/// The queued jobs, by whether they may scale the runners out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Backlog {
    /// Normal and high priority.
    pub schedulable: u64,
    /// Low priority (shadow jobs included).
    pub low: u64,
    /// False when there were more queued jobs than were read.
    pub complete: bool,
}

/// A tenant's limits and its use of them (`GET /v1/usage`).
#[derive(Debug, Clone)]
pub struct Usage {
    pub limits: TenantLimits,
    /// Jobs queued or running, counted up to the limit.
    pub active_jobs: u32,
    pub counted: crate::limits::Counted,
    /// The UTC day the units count in.
    pub day: Window,
    /// The minute the new jobs count in.
    pub minute: Window,
}

/// A job with a download link for each output (succeeded jobs only).
#[derive(Debug, Clone)]
pub struct JobWithLinks {
    pub job: Job,
    pub links: Vec<PresignedUrl>,
    /// Queued or running, read by `get`: where it stands and when it should start and finish.
    pub estimate: Option<Estimate>,
}

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Largest page of `list`.
pub const MAX_PAGE: u32 = 100;
/// Most queued jobs the backlog metric reads (past them it stays at this).
pub const BACKLOG_READ_LIMIT: u32 = 10_000;
/// Most queued jobs a queue estimate reads (past them, the position is a lower bound).
pub const QUEUE_READ_LIMIT: u32 = 2000;
/// How long the queue and the fleet read for estimates are reused (per process).
pub const ESTIMATES_REUSED_FOR: Duration = Duration::from_secs(2);
/// How many times a use case re-reads and retries when a concurrent writer won.
const MAX_RACES: usize = 5;
/// The first pause after a transaction conflict; the n-th waits n times as long.
const CONFLICT_PAUSE: std::time::Duration = std::time::Duration::from_millis(25);

/// Something read from a port, and when.
type Read<T> = (Instant, Arc<T>);

/// The job use cases over their ports.
pub struct Jobs {
    store: Arc<dyn JobStore>,
    queue: Arc<dyn JobQueue>,
    catalog: Arc<dyn ModelCatalog>,
    links: Arc<dyn ArtifactLinks>,
    fleet: Arc<dyn FleetBoard>,
    /// Where init images are read from.
    objects: Arc<dyn ObjectStore>,
    config: JobsConfig,
    models: Mutex<Option<Read<Vec<CatalogModel>>>>,
    /// The queue and the fleets as last read for estimates.
    snapshot: Mutex<Option<Read<Vec<QueuedJob>>>>,
    fleets: Mutex<HashMap<String, Read<Vec<RunnerReport>>>>,
}

impl Jobs {
    /// The job use cases on the store, the job queue, the catalog and the links of `ports`.
    pub fn new(ports: &Ports, config: JobsConfig) -> Self {
        Self {
            store: ports.store.clone(),
            queue: ports.queue.clone(),
            catalog: ports.catalog.clone(),
            links: ports.links.clone(),
            fleet: ports.fleet.clone(),
            objects: ports.objects.clone(),
            config,
            models: Mutex::new(None),
            snapshot: Mutex::new(None),
            fleets: Mutex::new(HashMap::new()),
        }
    }

    /// Accepts a job: validates the body against its model, then answers from the cache, joins
    /// an identical job in flight, replays an idempotent retry, or stores and queues a new job.
    pub async fn submit(
        &self,
        tenant: &Tenant,
        body: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<Submitted, AppError> {
        self.submit_to(tenant, body, idempotency_key, None, None).await
    }

    /// A job started by an upload to the S3 inbox: idempotent on the object version (a repeated
    /// S3 event starts no second job), with `outbox` (`outbox/<tenant>/<name>/`) recorded on the
    /// job so its result is copied there when it ends. When the upload was answered by another
    /// job (cached or in flight), the outbox is added to that job; the caller writes the outbox
    /// itself when the returned job has already ended. An image the spec names by file name is
    /// read from `folder` (the spec's own folder in the inbox).
    pub async fn submit_upload(
        &self,
        tenant: &Tenant,
        body: &[u8],
        object_id: &str,
        outbox: &str,
        folder: &str,
    ) -> Result<Submitted, AppError> {
        let digest = hex::encode(Sha256::digest(object_id.as_bytes()));
        let key = format!("s3-{}", &digest[..32]);
        let mut submitted = self.submit_to(tenant, body, Some(&key), Some(outbox), Some(folder)).await?;
        let revised = revise(&*self.store, submitted.job.clone(), |job| {
            if job.outboxes.iter().any(|o| o == outbox) || job.status.is_terminal() {
                return Ok(Change::Keep(()));
            }
            job.outboxes.push(outbox.to_owned());
            Ok(Change::Write(()))
        })
        .await?;
        submitted.job = revised.ok_or(AppError::Contention)?.0;
        Ok(submitted)
    }

    async fn submit_to(
        &self,
        tenant: &Tenant,
        body: &[u8],
        idempotency_key: Option<&str>,
        outbox: Option<&str>,
        inbox_folder: Option<&str>,
    ) -> Result<Submitted, AppError> {
        let submission = Submission::parse(body)?;
        let (name, version) = submission.model()?;
        let (model, shadows) = self.model(name, version, submission.fingerprint()).await?;
        let image = match submission.image_reference()? {
            Some(reference) => Some(self.read_image(&reference.key(&tenant.id, inbox_folder)?).await?),
            None => None,
        };
        let mut resolved =
            submission.resolve_with_image(&model, self.config.webhook_policy, || rand::rng().random(), image)?;
        let degraded = self.degrade(&model, &mut resolved).await;
        let idempotency = idempotency_key
            .map(|key| {
                check_idempotency_key(key).map(|()| IdempotencyRecord {
                    key: key.to_owned(),
                    fingerprint: submission.fingerprint().to_owned(),
                    job_id: JobId::generate(Utc::now()),
                })
            })
            .transpose()?;
        if let Some(record) = &idempotency
            && let Some(first) = self.store.idempotency_entry(&tenant.id, &record.key).await?
        {
            return self.replay(&tenant.id, record, first).await;
        }

        let now = Utc::now();
        let units = model.cost.units(&resolved.params);
        let mut charged = None;
        let placed =
            self.place(tenant, &model, resolved, idempotency, outbox, units, degraded, now, &mut charged).await;
        if let Some(charge) = charged
            && !matches!(placed, Ok(Submitted { disposition: Disposition::Created, .. }))
        {
            self.refund(&tenant.id, &charge).await;
        }
        if let Ok(Submitted { job, disposition: Disposition::Created }) = &placed {
            for spec in &shadows {
                self.shadow(job, &submission, spec).await;
            }
        }
        placed
    }

    /// The image at `key`, read whole and checked ([`kiln_domain::image::inspect`]).
    async fn read_image(&self, key: &str) -> Result<kiln_domain::InitImage, AppError> {
        let limit = kiln_domain::image::MAX_IMAGE_BYTES as usize;
        let bytes = match self.objects.get(key, None, limit).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                return Err(
                    InputError::invalid("init_image", "no such image: upload it first (POST /v1/uploads)").into()
                );
            }
            Err(ObjectError::TooLarge { limit }) => {
                return Err(InputError::invalid("init_image", format!("the image is larger than {limit} bytes")).into());
            }
            Err(ObjectError::Port(err)) => return Err(err.into()),
        };
        Ok(kiln_domain::image::inspect(key, &bytes)?)
    }

    /// `quality: auto` under load: while more jobs wait per GPU slot of the model version than
    /// the deployment's threshold (counted from the queue and the fleet as estimates read them),
    /// the request gets the model's fast preset; the warning says what was applied.
    async fn degrade(&self, model: &ModelSpec, resolved: &mut kiln_domain::params::Resolved) -> Option<String> {
        let fast = model.fast.filter(|fast| resolved.quality == Quality::Auto && fast.steps < resolved.params.steps)?;
        // Unknown load (the board or the queue could not be read; entry points that do not wire
        // the board, the S3 inbox's): as asked.
        let reports = self.fleet_of(&eta::board_key(&model.name, &model.version)).await?;
        let (queued, _) = self.queued_snapshot().await?;
        let waiting = queued.iter().filter(|q| q.model == model.name && q.model_version == model.version).count();
        let slots = eta::live_slots(&reports, Utc::now());
        let per_slot = waiting as f64 / f64::from(slots.max(1));
        let threshold = self.config.degrade_backlog_per_slot;
        if per_slot <= threshold {
            return None;
        }
        let asked = std::mem::replace(&mut resolved.params.steps, fast.steps);
        info!(model = %model.name, waiting, slots, asked, steps = fast.steps, "quality auto: the fast preset under load");
        Some(format!(
            "quality auto: {waiting} jobs were waiting for {slots} GPU slots ({per_slot:.1} a slot, over {threshold}); rendered with the model's fast preset: {} steps instead of {asked}",
            fast.steps
        ))
    }

    /// Renders `primary`'s request with the version `spec` too, as a shadow job: low priority,
    /// owned by [`SHADOW_TENANT`] (no client sees it), pointing at `primary` for comparison.
    /// Nothing about it reaches the caller; a shadow that cannot be made is logged and dropped.
    async fn shadow(&self, primary: &Job, submission: &Submission, spec: &ModelSpec) {
        let image = primary.params.init_image.clone();
        let resolved = match submission.resolve_with_image(
            spec,
            self.config.webhook_policy,
            || primary.params.seed,
            image,
        ) {
            Ok(resolved) => resolved,
            Err(err) => {
                info!(job_id = %primary.id, version = %spec.version, error = %err, "no shadow: the request does not fit this version");
                return;
            }
        };
        let now = Utc::now();
        let tenant = TenantId::parse(SHADOW_TENANT).expect("a valid tenant id");
        let mut job = Job::new(
            JobId::generate(now),
            tenant,
            spec.name.clone(),
            spec.version.clone(),
            resolved.params,
            None,
            now,
            self.config.queued_ttl,
        );
        job.shadow_of = Some(primary.id.clone());
        job.priority = Priority::Low;
        job.cost_units = spec.cost.units(&job.params);
        job.retention_secs = Some(self.config.output_retention.as_secs());
        let claim = CacheClaim { key: job.cache_key.clone(), replaces: None };
        match self.store.insert(&job, &claim, None).await {
            Ok(InsertOutcome::Inserted) => match self.queue.enqueue(&JobMessage::for_job(&job)).await {
                Ok(()) => {
                    info!(job_id = %job.id, shadow_of = %primary.id, version = %spec.version, "shadow job queued")
                }
                // Left queued without a message: the expiry sweep ends it.
                Err(err) => warn!(job_id = %job.id, error = %err, "shadow job not queued"),
            },
            Ok(outcome) => info!(shadow_of = %primary.id, ?outcome, "no shadow: an identical one exists"),
            Err(err) => warn!(shadow_of = %primary.id, error = %err, "shadow job not stored"),
        }
    }

    /// Answers from the cache, joins an identical job in flight, or stores and queues a new job
    /// (admitting it by the tenant's limits first, the charge left in `charged`).
    #[allow(clippy::too_many_arguments)]
    async fn place(
        &self,
        tenant: &Tenant,
        model: &ModelSpec,
        resolved: kiln_domain::params::Resolved,
        idempotency: Option<IdempotencyRecord>,
        outbox: Option<&str>,
        units: u64,
        degraded: Option<String>,
        now: DateTime<Utc>,
        charged: &mut Option<Charge>,
    ) -> Result<Submitted, AppError> {
        let cache_key = CacheKey::compute(&model.name, &model.version, &resolved.params);
        for race in 0..MAX_RACES {
            let replaces = match self.store.cache_entry(&tenant.id, &cache_key).await? {
                None => None,
                Some(job_id) => match self.store.get(&job_id).await? {
                    // Queued or running: join it; succeeded, with outputs that outlive a link: answer
                    // from the cache.
                    Some(job)
                        if job.tenant_id == tenant.id
                            && (!job.status.is_terminal() || self.outputs_outlive_a_link(&job, now)) =>
                    {
                        let disposition =
                            if job.status.is_terminal() { Disposition::Cached } else { Disposition::Deduplicated };
                        match self.join(job, resolved.webhook.as_ref()).await? {
                            Some(job) => return self.answer_existing(tenant, job, disposition, idempotency).await,
                            None => Some(job_id),
                        }
                    }
                    _ => Some(job_id),
                },
            };
            if race == 0 {
                *charged = Some(self.admit(tenant, units, now).await?);
            }
            let mut job = Job::new(
                idempotency.as_ref().map_or_else(|| JobId::generate(now), |r| r.job_id.clone()),
                tenant.id.clone(),
                model.name.clone(),
                model.version.clone(),
                resolved.params.clone(),
                resolved.webhook.clone(),
                now,
                self.config.queued_ttl,
            );
            job.outboxes.extend(outbox.map(str::to_owned));
            let max = tenant.max_priority.unwrap_or_default();
            job.priority = resolved.priority.min(max);
            if resolved.priority > max {
                job.warnings.push(format!(
                    "priority {} is above this account's maximum: queued as {}",
                    resolved.priority.as_str(),
                    max.as_str()
                ));
            }
            job.retention_secs = Some(self.config.output_retention.as_secs());
            job.cost_units = units;
            job.warnings.extend(degraded.clone());
            job.share_weight = tenant.share_weight.filter(|weight| *weight != 1);
            let claim = CacheClaim { key: cache_key.clone(), replaces };
            match self.store.insert(&job, &claim, idempotency.as_ref()).await? {
                InsertOutcome::Inserted => return self.enqueue(job, idempotency.as_ref()).await,
                InsertOutcome::CacheKeyTaken => continue,
                // The other write (most likely this request's twin) is committing: look again
                // once it has; the next round finds its job by the cache key, and its
                // idempotency record when recording ours fails.
                InsertOutcome::Conflicted => tokio::time::sleep(CONFLICT_PAUSE * (race as u32 + 1)).await,
                InsertOutcome::IdempotencyKeyTaken => {
                    let record = idempotency.as_ref().ok_or(AppError::Contention)?;
                    let first =
                        self.store.idempotency_entry(&tenant.id, &record.key).await?.ok_or(AppError::Contention)?;
                    return self.replay(&tenant.id, record, first).await;
                }
            }
        }
        Err(AppError::Contention)
    }

    /// Whether a succeeded job's outputs are kept for at least a download link's lifetime from
    /// `now` (otherwise a cache hit would hand out links that stop working: it renders again).
    fn outputs_outlive_a_link(&self, job: &Job, now: DateTime<Utc>) -> bool {
        let link = chrono::Duration::from_std(self.config.link_ttl).unwrap_or(chrono::Duration::MAX);
        match job.outputs_expire_at(self.config.output_retention) {
            Some(expire_at) => expire_at > now + link,
            // Succeeded before retention was recorded: served as before.
            None => job.status == JobStatus::Succeeded && job.retention_secs.is_none(),
        }
    }

    /// Joins a caller to an existing identical job: its webhook (if it sent one) is added to the
    /// job's, so it gets its own events (`completed` at once if the job already ended). None
    /// when the job carries as many webhooks as it may (the caller gets a job of its own).
    async fn join(&self, job: Job, webhook: Option<&Webhook>) -> Result<Option<Job>, AppError> {
        let Some(webhook) = webhook else { return Ok(Some(job)) };
        let joined = revise(&*self.store, job, |job| {
            Ok(match job.subscribe(webhook) {
                Subscription::Added => Change::Write(true),
                Subscription::AlreadyThere => Change::Keep(true),
                Subscription::Full => Change::Keep(false),
            })
        })
        .await?;
        match joined {
            Some((job, true)) => Ok(Some(job)),
            Some((job, false)) => {
                info!(job_id = %job.id, "job carries the most webhooks it may; the caller gets its own job");
                Ok(None)
            }
            None => Err(AppError::Contention),
        }
    }

    /// Whether the tenant's limits let it add a job costing `units` now: the quota on jobs
    /// queued or running, then the job and its units are counted in the minute's rate and the
    /// day's units, both at once and only within both limits (so concurrent submits cannot
    /// both pass the last units). The charge is returned, to refund if the job is not accepted.
    async fn admit(&self, tenant: &Tenant, units: u64, now: DateTime<Utc>) -> Result<Charge, AppError> {
        let limits = tenant.limits.unwrap_or(self.config.default_limits);
        let active = self.store.count_active(&tenant.id, limits.max_active_jobs).await?;
        if active >= limits.max_active_jobs {
            info!(tenant_id = %tenant.id, active, limit = limits.max_active_jobs, "job refused: active jobs quota");
            return Err(AppError::QuotaExceeded { limit: limits.max_active_jobs });
        }
        let charge = Charge {
            minute: Window::minute(now),
            day: Window::day(now),
            units,
            jobs_per_minute: limits.jobs_per_minute,
            units_per_day: limits.units_per_day,
        };
        match self.store.charge(&tenant.id, &charge).await? {
            Charged::Counted => Ok(charge),
            Charged::RateLimited => {
                info!(tenant_id = %tenant.id, limit = limits.jobs_per_minute, "job refused: rate limit");
                Err(AppError::RateLimited {
                    limit: limits.jobs_per_minute,
                    retry_after_secs: charge.minute.secs_left(now),
                    resets_at: charge.minute.resets_at(),
                })
            }
            Charged::OutOfUnits { used } => {
                info!(tenant_id = %tenant.id, used, units, limit = limits.units_per_day, "job refused: daily units");
                Err(AppError::UnitsExhausted {
                    limit: limits.units_per_day,
                    used,
                    cost: units,
                    resets_at: charge.day.resets_at(),
                    retry_after_secs: charge.day.secs_left(now),
                })
            }
        }
    }

    /// The tenant's limits and what counts against them now.
    pub async fn usage(&self, tenant: &Tenant) -> Result<Usage, AppError> {
        let now = Utc::now();
        let limits = tenant.limits.unwrap_or(self.config.default_limits);
        let (day, minute) = (Window::day(now), Window::minute(now));
        let (active_jobs, counted) = tokio::try_join!(
            self.store.count_active(&tenant.id, limits.max_active_jobs),
            self.store.counted(&tenant.id, day, minute),
        )?;
        Ok(Usage { limits, active_jobs, counted, day, minute })
    }

    /// Gives back a charge whose job was not accepted (a lost race, a queue that failed).
    async fn refund(&self, tenant: &TenantId, charge: &Charge) {
        if let Err(err) = self.store.refund(tenant, charge).await {
            warn!(tenant_id = %tenant, units = charge.units, error = %err, "could not refund a charge; the tenant's counters keep it");
        }
    }

    /// Puts a stored job on the queue. If that fails, the job is failed and its keys released at
    /// once, so it never sits queued with no message; the client gets a 503 and may resubmit.
    async fn enqueue(&self, mut job: Job, idempotency: Option<&IdempotencyRecord>) -> Result<Submitted, AppError> {
        let message = JobMessage::for_job(&job);
        let Err(error) = self.queue.enqueue(&message).await else {
            info!(job_id = %job.id, tenant_id = %job.tenant_id, model = %job.model, "job queued");
            return Ok(Submitted { job, disposition: Disposition::Created });
        };
        warn!(job_id = %job.id, error = %error, "enqueue failed; failing the job");
        // If these writes fail too, the job stays queued without a message and the expiry
        // sweep ends it when its time to live runs out.
        let failed = revise(&*self.store, job.clone(), |job| {
            if job.status != JobStatus::Queued {
                return Ok(Change::Keep(()));
            }
            job.fail(JobErrorCode::EnqueueFailed, "the job could not be queued; submit it again", Utc::now())?;
            Ok(Change::Write(()))
        })
        .await;
        match failed {
            Ok(Some((stored, ()))) => job = stored,
            Ok(None) => {}
            Err(err) => warn!(job_id = %job.id, error = %err, "could not mark the unqueued job failed"),
        }
        if let Err(err) = self.store.release_keys(&job, idempotency.map(|r| r.key.as_str())).await {
            warn!(job_id = %job.id, error = %err, "could not release the unqueued job's keys");
        }
        Err(AppError::QueueUnavailable(error))
    }

    /// Answers with an existing job, recording the idempotency key for it first if one was sent.
    async fn answer_existing(
        &self,
        tenant: &Tenant,
        job: Job,
        disposition: Disposition,
        idempotency: Option<IdempotencyRecord>,
    ) -> Result<Submitted, AppError> {
        if let Some(mut record) = idempotency {
            record.job_id = job.id.clone();
            if !self.store.put_idempotency(&tenant.id, &record).await? {
                let first = self.store.idempotency_entry(&tenant.id, &record.key).await?.ok_or(AppError::Contention)?;
                return self.replay(&tenant.id, &record, first).await;
            }
        }
        Ok(Submitted { job, disposition })
    }

    async fn replay(
        &self,
        tenant: &TenantId,
        sent: &IdempotencyRecord,
        first: IdempotencyRecord,
    ) -> Result<Submitted, AppError> {
        if first.fingerprint != sent.fingerprint {
            return Err(AppError::IdempotencyMismatch);
        }
        match self.store.get(&first.job_id).await? {
            Some(job) if &job.tenant_id == tenant => Ok(Submitted { job, disposition: Disposition::Replayed }),
            // The record was written in the same transaction as the job, so this is only
            // reached if the job was deleted by retention.
            _ => Err(AppError::NotFound(first.job_id.to_string())),
        }
    }

    /// A job of this tenant's, with download links when it has succeeded.
    /// A job of this tenant's, with download links when it has succeeded, and where it stands
    /// (queue position, step, estimated start and finish) while queued or running.
    pub async fn get(&self, tenant: &Tenant, id: &str) -> Result<JobWithLinks, AppError> {
        let job = self.owned(tenant, id).await?;
        let estimate = self.estimate(&job).await;
        Ok(JobWithLinks { estimate, ..self.with_links(job).await? })
    }

    /// The estimate of a queued or running job, from the queue and the fleet as read at most
    /// [`ESTIMATES_REUSED_FOR`] ago. None when it has ended, or when they cannot be read (the
    /// job is answered all the same).
    async fn estimate(&self, job: &Job) -> Option<Estimate> {
        if job.status.is_terminal() {
            return None;
        }
        let fleet = self.fleet_of(&eta::board_key(&job.model, &job.model_version)).await;
        let (queued, complete) = match job.status {
            JobStatus::Queued => self.queued_snapshot().await?,
            _ => (Arc::default(), true),
        };
        let fleet = fleet.and_then(|reports| eta::Fleet::of(&reports, Utc::now()));
        eta::of_job(job, &queued, complete, fleet.as_ref(), Utc::now())
    }

    /// The oldest queued jobs (at most [`QUEUE_READ_LIMIT`]), and whether that is all of them.
    async fn queued_snapshot(&self) -> Option<(Arc<Vec<QueuedJob>>, bool)> {
        let cached = lock(&self.snapshot).clone();
        if let Some((at, queued)) = cached
            && at.elapsed() < ESTIMATES_REUSED_FOR
        {
            let complete = queued.len() < QUEUE_READ_LIMIT as usize;
            return Some((queued, complete));
        }
        match self.store.queued_jobs(QUEUE_READ_LIMIT).await {
            Ok(queued) => {
                let queued = Arc::new(queued);
                *lock(&self.snapshot) = Some((Instant::now(), queued.clone()));
                let complete = queued.len() < QUEUE_READ_LIMIT as usize;
                Some((queued, complete))
            }
            Err(err) => {
                warn!(error = %err, "reading the queue for estimates failed; answering without");
                None
            }
        }
    }

    /// The runners' reports for `model`.
    async fn fleet_of(&self, model: &str) -> Option<Arc<Vec<RunnerReport>>> {
        let cached = lock(&self.fleets).get(model).cloned();
        if let Some((at, reports)) = cached
            && at.elapsed() < ESTIMATES_REUSED_FOR
        {
            return Some(reports);
        }
        match self.fleet.reports(model).await {
            Ok(reports) => {
                let reports = Arc::new(reports);
                lock(&self.fleets).insert(model.to_owned(), (Instant::now(), reports.clone()));
                Some(reports)
            }
            Err(err) => {
                warn!(error = %err, model, "reading the fleet for estimates failed; answering without");
                None
            }
        }
    }

    /// Adds fresh download links to a succeeded job's outputs.
    pub async fn with_links(&self, job: Job) -> Result<JobWithLinks, AppError> {
        let mut links = Vec::new();
        if job.status == JobStatus::Succeeded {
            // A link never outlives the output it points at.
            let kept_for = job
                .outputs_expire_at(self.config.output_retention)
                .map(|end| (end - Utc::now()).to_std().unwrap_or(Duration::ZERO));
            let valid_for = kept_for
                .map_or(self.config.link_ttl, |kept| kept.min(self.config.link_ttl))
                .max(Duration::from_secs(1));
            for output in &job.outputs {
                links.push(self.links.presign_get(&output.key, valid_for).await?);
            }
        }
        Ok(JobWithLinks { job, links, estimate: None })
    }

    /// The tenant's jobs, newest first.
    pub async fn list(
        &self,
        tenant: &Tenant,
        status: Option<JobStatus>,
        limit: u32,
        after: Option<&JobId>,
    ) -> Result<JobPage, AppError> {
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(InputError::invalid("limit", format!("must be between 1 and {MAX_PAGE} (got {limit})")).into());
        }
        Ok(self.store.list(&tenant.id, status, limit, after).await?)
    }

    /// Cancels a queued job at once; flags a running one so its runner stops it. A job that has
    /// already ended is a conflict, except one already canceled (canceling is idempotent).
    pub async fn cancel(&self, tenant: &Tenant, id: &str) -> Result<Job, AppError> {
        let job = self.owned(tenant, id).await?;
        let canceled = revise(&*self.store, job, |job| match job.status {
            JobStatus::Queued => {
                job.transition(JobStatus::Canceled, Utc::now())?;
                Ok(Change::Write(()))
            }
            JobStatus::Running => Ok(if job.request_cancel() { Change::Write(()) } else { Change::Keep(()) }),
            JobStatus::Canceled => Ok(Change::Keep(())),
            status => Err(AppError::AlreadyFinished { id: job.id.clone(), status }),
        })
        .await?;
        let (job, ()) = canceled.ok_or_else(|| AppError::NotFound(id.to_owned()))?;
        info!(job_id = %job.id, status = %job.status, "cancel handled");
        Ok(job)
    }

    /// The served models, read through a short-lived cache.
    /// The catalog: each model with its versions, by name.
    pub async fn models(&self) -> Result<Arc<Vec<CatalogModel>>, AppError> {
        if let Some((at, models)) = lock(&self.models).as_ref()
            && at.elapsed() < self.config.catalog_ttl
        {
            return Ok(models.clone());
        }
        let mut models = self.catalog.models().await?;
        models.sort_by(|a, b| a.name.cmp(&b.name));
        let models = Arc::new(models);
        *lock(&self.models) = Some((Instant::now(), models.clone()));
        Ok(models)
    }

    /// The model version a request renders with: the one it pins (`name@version`), else one
    /// picked by weight from `key` (identical requests get the same one); and the versions that
    /// shadow it.
    async fn model(
        &self,
        name: &str,
        version: Option<&str>,
        key: &str,
    ) -> Result<(ModelSpec, Vec<ModelSpec>), AppError> {
        let models = self.models().await?;
        let unknown =
            |message: String| InputError::new(InputErrorKind::UnknownModel, Some("model".to_owned()), message);
        let model = models.iter().find(|m| m.name == name && m.active().next().is_some()).ok_or_else(|| {
            let names: Vec<&str> =
                models.iter().filter(|m| m.active().next().is_some()).map(|m| m.name.as_str()).collect();
            unknown(format!("no model `{}`; served: {}", truncate(name, 64), names.join(", ")))
        })?;
        let active = || model.active().map(|v| v.version()).collect::<Vec<_>>().join(", ");
        let served = match version {
            Some(version) => match model.version(version) {
                Some(served) if !served.retired => served,
                Some(_) => {
                    return Err(unknown(format!(
                        "model `{name}` version `{}` is retired; served versions: {}",
                        truncate(version, 32),
                        active()
                    ))
                    .into());
                }
                None => {
                    return Err(unknown(format!(
                        "model `{name}` has no version `{}`; served versions: {}",
                        truncate(version, 32),
                        active()
                    ))
                    .into());
                }
            },
            None => model
                .pick(hash_key(key, "version"))
                .ok_or_else(|| unknown(format!("model `{name}` has no served version")))?,
        };
        let shadows =
            model.shadows(served.version(), hash_key(key, "shadow")).into_iter().map(|v| v.spec.clone()).collect();
        Ok((served.spec.clone(), shadows))
    }

    /// The queued jobs that may make the runner group grow (normal and high priority) and the
    /// low-priority ones, which never do on their own: they run on the runners other work
    /// brought (RunPod's low priority). Shadow jobs are low. Counted over at most
    /// [`BACKLOG_READ_LIMIT`] jobs.
    pub async fn backlog(&self) -> Result<Backlog, AppError> {
        let queued = self.store.queued_jobs(BACKLOG_READ_LIMIT).await?;
        let low = queued.iter().filter(|job| job.priority == Priority::Low).count() as u64;
        Ok(Backlog {
            schedulable: queued.len() as u64 - low,
            low,
            complete: queued.len() < BACKLOG_READ_LIMIT as usize,
        })
    }

    /// Expires queued jobs whose time to live has passed. Returns how many it expired.
    pub async fn expire_overdue(&self, now: DateTime<Utc>, batch: u32) -> Result<usize, AppError> {
        let mut expired = 0;
        for job in self.store.queued_expired_by(now, batch).await? {
            let outcome = revise(&*self.store, job, |job| {
                // A runner may have started it since the index was read: then it stays.
                if job.status != JobStatus::Queued || job.expires_at > now {
                    return Ok(Change::Keep(false));
                }
                job.transition(JobStatus::Expired, now)?;
                Ok(Change::Write(true))
            })
            .await?;
            if let Some((job, true)) = outcome {
                info!(job_id = %job.id, "job expired before any runner started it");
                expired += 1;
                // It never rendered: its units go back to its tenant's day.
                if job.cost_units > 0 && job.shadow_of.is_none() {
                    let day = Window::day(job.created_at);
                    if let Err(err) = self.store.refund_units(&job.tenant_id, day, job.cost_units).await {
                        warn!(job_id = %job.id, error = %err, "could not give the expired job's units back");
                    }
                }
            }
        }
        Ok(expired)
    }

    /// Reads a job, hiding other tenants' jobs behind the same answer as a missing one.
    async fn owned(&self, tenant: &Tenant, id: &str) -> Result<Job, AppError> {
        let not_found = || AppError::NotFound(truncate(id, 40));
        let id = JobId::parse(id).map_err(|_| not_found())?;
        match self.store.get(&id).await? {
            Some(job) if job.tenant_id == tenant.id => Ok(job),
            _ => Err(not_found()),
        }
    }
}

fn check_idempotency_key(key: &str) -> Result<(), InputError> {
    let printable = key.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN || !printable {
        return Err(InputError::invalid(
            "Idempotency-Key",
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters without spaces"),
        ));
    }
    Ok(())
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// A number drawn from `key` for `purpose`: the same for the same request, independent across
/// purposes.
fn hash_key(key: &str, purpose: &str) -> u64 {
    let digest =
        Sha256::new().chain_update(purpose.as_bytes()).chain_update(b"\0").chain_update(key.as_bytes()).finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

//! What clients see of a job: the JSON shape every job route answers, webhooks carry and the
//! inbox writes as `result.json`.

use crate::{
    eta::Estimate,
    jobs::{JobWithLinks, Usage},
    ports::PresignedUrl,
};
use chrono::{DateTime, Utc};
use kiln_domain::{Job, JobError, JobParams, JobStatus, Timings, Webhook};
use serde::Serialize;

/// A job as returned by every job route.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobView<'a> {
    pub id: &'a str,
    pub status: JobStatus,
    pub model: &'a str,
    pub model_version: &'a str,
    /// The parameters the job renders with, defaults applied and the seed recorded.
    pub input: &'a JobParams,
    /// As asked, capped by the account's maximum.
    pub priority: kiln_domain::Priority,
    /// What it costs in GPU-work units, counted against the account's daily units.
    pub cost_units: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<&'a Webhook>,
    pub progress: f32,
    /// Queued or running (`GET /v1/jobs/{id}`): `queue_position`, `step`/`steps`,
    /// `estimated_start_at`, `estimated_finish_at` and what they stand on (`estimate_basis`).
    /// (The document lists these fields among the job's own: see `kiln_api::openapi`.)
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub estimate: Option<&'a Estimate>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// While queued: when the job expires if no runner has started it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    pub attempts: u32,
    pub cancel_requested: bool,
    pub error: Option<&'a JobError>,
    pub outputs: Vec<OutputView<'a>>,
    pub timings: &'a Timings,
    /// What the client should know about how the job was rendered (a prompt cut to fit).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub warnings: &'a [String],
    /// How delivering this job's webhook events went (attempts, last status and error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_delivery: Option<&'a kiln_domain::WebhookDelivery>,
    /// On submission: the result of an earlier identical job was returned, nothing rendered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached: Option<bool>,
    /// On submission: an identical job was already queued or running and is returned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deduplicated: Option<bool>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OutputView<'a> {
    pub key: &'a str,
    pub content_type: &'a str,
    pub bytes: u64,
    /// A presigned GET URL, on succeeded jobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_expires_at: Option<DateTime<Utc>>,
    /// When the output may be deleted (its job's end + the output retention).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

impl<'a> JobView<'a> {
    pub fn new(job: &'a Job, links: &'a [PresignedUrl]) -> Self {
        let expires_at = job.outputs_expire_at(std::time::Duration::MAX);
        let outputs = job
            .outputs
            .iter()
            .enumerate()
            .map(|(i, output)| OutputView {
                key: &output.key,
                content_type: &output.content_type,
                bytes: output.bytes,
                url: links.get(i).map(|l| l.url.as_str()),
                url_expires_at: links.get(i).map(|l| l.expires_at),
                expires_at,
            })
            .collect();
        Self {
            id: job.id.as_str(),
            status: job.status,
            model: &job.model,
            model_version: &job.model_version,
            input: &job.params,
            priority: job.priority,
            cost_units: job.cost_units,
            webhook: job.webhook.as_ref(),
            progress: job.progress,
            estimate: None,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            expires_at: (job.status == JobStatus::Queued).then_some(job.expires_at),
            attempts: job.attempts,
            cancel_requested: job.cancel_requested,
            error: job.error.as_ref(),
            outputs,
            timings: &job.timings,
            warnings: &job.warnings,
            webhook_delivery: job.webhook_delivery.as_ref(),
            cached: None,
            deduplicated: None,
        }
    }

    pub fn with_links(read: &'a JobWithLinks) -> Self {
        Self { estimate: read.estimate.as_ref(), ..Self::new(&read.job, &read.links) }
    }
}

/// A tenant's limits and its use of them, as `GET /v1/usage` answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageView {
    /// GPU-work units of new jobs this UTC day (see a job's `cost_units`).
    pub units_per_day: Counter<u64>,
    /// New jobs this minute.
    pub jobs_per_minute: Counter<u32>,
    /// Jobs queued or running now (counted up to the limit); frees up as jobs end.
    pub max_active_jobs: Counter<u32>,
}

/// One limit: what it allows, what is used, what is left, and when the count starts again.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Counter<T> {
    pub limit: T,
    pub used: T,
    pub remaining: T,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<DateTime<Utc>>,
}

impl<T: Copy + Ord + std::ops::Sub<Output = T>> Counter<T> {
    fn new(limit: T, used: T, resets_at: Option<DateTime<Utc>>) -> Self {
        Self { limit, used, remaining: limit - used.min(limit), resets_at }
    }
}

impl UsageView {
    pub fn new(usage: &Usage) -> Self {
        let limits = &usage.limits;
        Self {
            units_per_day: Counter::new(limits.units_per_day, usage.counted.units_today, Some(usage.day.resets_at())),
            jobs_per_minute: Counter::new(
                limits.jobs_per_minute,
                usage.counted.jobs_this_minute,
                Some(usage.minute.resets_at()),
            ),
            max_active_jobs: Counter::new(limits.max_active_jobs, usage.active_jobs, None),
        }
    }
}

/// A model as `GET /v1/models` lists it: its default version's description (what a request
/// without a version most likely gets), and every version a request may pin.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelView<'a> {
    #[serde(flatten)]
    pub spec: &'a kiln_domain::ModelSpec,
    pub versions: Vec<VersionView<'a>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VersionView<'a> {
    pub version: &'a str,
    /// Its share of requests without a version, relative to the others'.
    pub weight: u32,
}

impl<'a> ModelView<'a> {
    /// Each model with a version to serve, by name.
    pub fn list(models: &'a [kiln_domain::CatalogModel]) -> Vec<Self> {
        models
            .iter()
            .filter_map(|model| {
                let spec = &model.default_version()?.spec;
                let versions = model.active().map(|v| VersionView { version: v.version(), weight: v.weight }).collect();
                Some(Self { spec, versions })
            })
            .collect()
    }
}

/// `GET /v1/jobs`: a page of the tenant's jobs, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobPage<'a> {
    pub jobs: Vec<JobView<'a>>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelList<'a> {
    pub models: Vec<ModelView<'a>>,
}

/// The tenant's webhook signing secret (`GET /v1/webhooks/secret`, and after a rotation).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SecretView<'a> {
    /// `whsec_` and base64: the Standard Webhooks secret that signs every webhook request.
    #[schema(example = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]
    pub secret: &'a str,
    pub created_at: DateTime<Utc>,
    /// After a rotation: how long the previous secret keeps signing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
}

/// What a webhook request carries (signed with the tenant's secret, Standard Webhooks headers
/// `webhook-id`, `webhook-timestamp`, `webhook-signature`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookPayload<'a> {
    #[serde(rename = "type")]
    pub kind: kiln_domain::WebhookEvent,
    pub timestamp: DateTime<Utc>,
    /// The job as `GET /v1/jobs/{id}` shows it, with fresh download links when it succeeded.
    pub job: JobView<'a>,
}

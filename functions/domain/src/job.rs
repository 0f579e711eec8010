//! The job record: what was asked, where it stands, what it produced and how long each stage took.

use crate::{
    cache_key::CacheKey,
    ids::{JobId, TenantId},
    params::{JobParams, Webhook},
    status::JobStatus,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Why a job failed, in a form clients can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobErrorCode {
    /// The job could not be put on the job queue; submitting again is safe.
    EnqueueFailed,
    /// The parameters cannot be rendered by the model (found by the runner).
    InvalidForModel,
    /// Rendering or encoding failed.
    RenderFailed,
    /// Every delivery attempt failed; the message went to the dead-letter queue.
    DeadLettered,
    /// The render took longer than its model's budget for a job of its size allows.
    RenderTimeout,
    /// No runner served the job's model version within the wait for one (a version pinned
    /// while none of its runners run, or a deploy that removed it).
    ModelVersionUnavailable,
    /// Anything else.
    Internal,
}

/// What went wrong, for a failed job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    pub code: JobErrorCode,
    pub message: String,
}

/// One artifact a job produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// The object key in the artifacts bucket.
    pub key: String,
    pub content_type: String,
    pub bytes: u64,
}

/// The webhook deliveries of one job, summed up: visible on the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookDelivery {
    /// HTTP attempts, all events together.
    pub attempts: u32,
    /// Events the receiver accepted (2xx).
    pub delivered: u32,
    /// Events given up on (a 4xx that is not 408/429, or the retry schedule ran out).
    pub abandoned: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_at: Option<DateTime<Utc>>,
}

/// Milliseconds spent in each stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Timings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<u64>,
    /// From the runner handing the job to its model's session to the render call of its batch:
    /// waiting for the session to be free and for the batch to fill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_wait_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub render_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encode_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_ms: Option<u64>,
}

/// How soon a job should be served against the other jobs waiting (`priority` on a request,
/// capped by its tenant's maximum). Runners start a higher priority first; a job waiting in a
/// runner's hold rises one level per [`Priority::AGING`] of its age, so none waits for ever.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    /// The age (since submission) that lifts a waiting job one level in a runner's choice.
    pub const AGING: std::time::Duration = std::time::Duration::from_secs(60);

    pub fn is_normal(&self) -> bool {
        *self == Self::Normal
    }

    /// 0 (low) to 2 (high).
    pub fn level(self) -> u8 {
        self as u8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Normal => "normal",
            Self::High => "high",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Low, Self::Normal, Self::High].into_iter().find(|p| p.as_str() == text)
    }
}

/// A job, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub tenant_id: TenantId,
    pub model: String,
    /// The model version the request resolved to when it was accepted.
    pub model_version: String,
    pub params: JobParams,
    /// As asked, capped by the tenant's maximum (normal when not asked).
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
    /// What it costs in GPU-work units (its model's [`crate::CostModel`]), counted against its
    /// tenant's daily quota when it was accepted. 0 for jobs accepted before costs were kept.
    #[serde(default)]
    pub cost_units: u64,
    /// A shadow job: the same request rendered by another version of the model for comparison
    /// with this job (its tenant is [`crate::SHADOW_TENANT`]; nobody is answered with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_of: Option<JobId>,
    /// Its tenant's weight in fair share when it was accepted (None: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
    /// The webhooks of later callers whose identical request joined this job (dedup, or an
    /// answer from the cache), in the order they came: each gets the events it asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscribers: Vec<Webhook>,
    pub status: JobStatus,
    /// 0 to 1.
    pub progress: f32,
    pub cache_key: CacheKey,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// A queued job not started by then expires.
    pub expires_at: DateTime<Utc>,
    /// How long its outputs are kept after it ends: the deployment's output retention when the
    /// job was accepted (the bucket's lifecycle deletes them then). None for jobs accepted
    /// before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_secs: Option<u64>,
    /// How many times a runner has started it.
    pub attempts: u32,
    /// The job queue message the current run holds (set when a run starts). The run's lease is
    /// that message's invisibility, renewed by the runner's heartbeat: only that message coming
    /// back (its runner stopped renewing) may restart the job; any other message for a running
    /// job is a duplicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_message: Option<String>,
    /// The client asked to cancel while it was running; the runner stops at the next step.
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    #[serde(default)]
    pub outputs: Vec<Output>,
    #[serde(default)]
    pub timings: Timings,
    /// What the client should know about how the job was rendered (a prompt cut to fit the text
    /// encoder, say).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// For jobs started by uploads to the S3 inbox: the `outbox/<tenant>/<name>/` prefixes its
    /// artifacts and result JSON are copied to when it ends (several when identical uploads were
    /// deduplicated onto one job).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outboxes: Vec<String>,
    /// How delivering the job's webhook events went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_delivery: Option<WebhookDelivery>,
    /// The number of writes the stored job has seen. Set by the one place that writes changes
    /// (`kiln-app`'s `revise`), never by the changes themselves: stores write only when the
    /// stored revision is the one read, so two writers racing on one job can never both win.
    pub revision: u64,
}

/// What [`Job::subscribe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    /// The webhook was added: write the job.
    Added,
    /// The job already sends these events to this URL: nothing to write.
    AlreadyThere,
    /// The job carries [`Job::MAX_SUBSCRIBERS`] already.
    Full,
}

/// A change the job's status does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job {id} cannot go from {from} to {to}")]
pub struct IllegalTransition {
    pub id: JobId,
    pub from: JobStatus,
    pub to: JobStatus,
}

impl Job {
    /// A freshly accepted job.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: JobId,
        tenant_id: TenantId,
        model: String,
        model_version: String,
        params: JobParams,
        webhook: Option<Webhook>,
        now: DateTime<Utc>,
        time_to_live: chrono::Duration,
    ) -> Self {
        let cache_key = CacheKey::compute(&model, &model_version, &params);
        Self {
            id,
            tenant_id,
            model,
            model_version,
            params,
            priority: Priority::Normal,
            cost_units: 0,
            share_weight: None,
            shadow_of: None,
            webhook,
            subscribers: Vec::new(),
            status: JobStatus::Queued,
            progress: 0.0,
            cache_key,
            created_at: now,
            started_at: None,
            finished_at: None,
            expires_at: now + time_to_live,
            retention_secs: None,
            attempts: 0,
            run_message: None,
            cancel_requested: false,
            error: None,
            outputs: Vec::new(),
            timings: Timings::default(),
            warnings: Vec::new(),
            outboxes: Vec::new(),
            webhook_delivery: None,
            revision: 0,
        }
    }

    /// Moves the job to `to`, stamping the times that move implies. Starting (or restarting a
    /// job whose runner died) counts an attempt; a terminal status sets `finished_at`.
    pub fn transition(&mut self, to: JobStatus, now: DateTime<Utc>) -> Result<(), IllegalTransition> {
        if !self.status.can_become(to) {
            return Err(IllegalTransition { id: self.id.clone(), from: self.status, to });
        }
        if to == JobStatus::Running {
            self.attempts += 1;
            self.started_at = Some(now);
            self.timings.queue_ms = Some(millis_between(self.created_at, now));
        }
        if to.is_terminal() {
            self.finished_at = Some(now);
        }
        if to == JobStatus::Succeeded {
            self.progress = 1.0;
        }
        self.status = to;
        Ok(())
    }

    /// Ends the job as failed with a reason.
    pub fn fail(
        &mut self,
        code: JobErrorCode,
        message: impl Into<String>,
        now: DateTime<Utc>,
    ) -> Result<(), IllegalTransition> {
        self.transition(JobStatus::Failed, now)?;
        self.error = Some(JobError { code, message: message.into() });
        Ok(())
    }

    /// Flags a running job so its runner stops at the next step. Returns false when the job is
    /// not running or already flagged (nothing to write).
    pub fn request_cancel(&mut self) -> bool {
        if self.status != JobStatus::Running || self.cancel_requested {
            return false;
        }
        self.cancel_requested = true;
        true
    }

    /// The most webhooks of joined callers one job carries.
    pub const MAX_SUBSCRIBERS: usize = 25;

    /// Adds the webhook of a caller whose identical request joined this job.
    pub fn subscribe(&mut self, webhook: &Webhook) -> Subscription {
        if self.webhook.as_ref() == Some(webhook) || self.subscribers.contains(webhook) {
            return Subscription::AlreadyThere;
        }
        if self.subscribers.len() >= Self::MAX_SUBSCRIBERS {
            return Subscription::Full;
        }
        self.subscribers.push(webhook.clone());
        Subscription::Added
    }

    /// Every webhook of the job with its place: 0 for the first caller's, n for the n-th
    /// subscriber's.
    pub fn webhooks(&self) -> impl Iterator<Item = (usize, &Webhook)> {
        let first = self.webhook.iter().map(|webhook| (0, webhook));
        first.chain(self.subscribers.iter().enumerate().map(|(n, webhook)| (n + 1, webhook)))
    }

    /// Records render progress (clamped to 0..1).
    pub fn set_progress(&mut self, progress: f32) {
        self.progress = progress.clamp(0.0, 1.0);
    }

    /// Ends a running job as succeeded with its artifacts and the time each stage took (the
    /// queue wait already recorded at start is kept).
    pub fn succeed(
        &mut self,
        outputs: Vec<Output>,
        timings: Timings,
        now: DateTime<Utc>,
    ) -> Result<(), IllegalTransition> {
        self.transition(JobStatus::Succeeded, now)?;
        self.outputs = outputs;
        self.timings = Timings { queue_ms: self.timings.queue_ms, ..timings };
        Ok(())
    }

    /// Extra time a record is kept past its outputs' retention: a job may end up to its render
    /// budget after its queued time to live, and a record outliving its outputs is harmless.
    const RECORD_MARGIN: chrono::Duration = chrono::Duration::days(1);

    /// When a succeeded job's outputs may be deleted (`finished_at` + the retention; S3 deletes
    /// them at or after it), given the deployment's retention now (the shorter one counts).
    pub fn outputs_expire_at(&self, current_retention: std::time::Duration) -> Option<DateTime<Utc>> {
        let recorded = std::time::Duration::from_secs(self.retention_secs?);
        let retention = chrono::Duration::from_std(recorded.min(current_retention)).ok()?;
        (self.status == JobStatus::Succeeded).then_some(self.finished_at? + retention)
    }

    /// When the stores may delete the job's record and its cache pointer (DynamoDB's TTL): past
    /// any time its outputs can still be kept.
    pub fn purge_at(&self) -> Option<DateTime<Utc>> {
        let retention = chrono::Duration::seconds(i64::try_from(self.retention_secs?).ok()?);
        Some(self.expires_at + retention + Self::RECORD_MARGIN)
    }

    /// The key under which the job's artifact with this extension is stored. Fixed by the job id,
    /// so a redelivered job overwrites its artifact instead of adding a second one.
    pub fn output_key(&self, extension: &str) -> String {
        format!("jobs/{}/{}/output.{extension}", self.tenant_id, self.id)
    }

    /// The key of the artifact a run of the job writes (in its requested format): what a
    /// success links first.
    pub fn artifact_key(&self) -> String {
        self.output_key(self.params.format.as_str())
    }

    /// A video job's poster: its first frame as a PNG, its second output. None for an image.
    pub fn poster_key(&self) -> Option<String> {
        (!self.params.format.is_image()).then(|| format!("jobs/{}/{}/poster.png", self.tenant_id, self.id))
    }

    /// Every object a run of the job writes: what a cancel removes.
    pub fn artifact_keys(&self) -> Vec<String> {
        std::iter::once(self.artifact_key()).chain(self.poster_key()).collect()
    }
}

fn millis_between(start: DateTime<Utc>, end: DateTime<Utc>) -> u64 {
    u64::try_from((end - start).num_milliseconds()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::tests::demo,
        params::{Submission, WebhookPolicy},
    };

    fn job() -> Job {
        let model = demo();
        let params = Submission::parse(br#"{"model":"demo","prompt":"x"}"#)
            .unwrap()
            .resolve(&model, WebhookPolicy::default(), || 1)
            .unwrap()
            .params;
        let now = Utc::now();
        Job::new(
            JobId::generate(now),
            TenantId::parse("t").unwrap(),
            model.name,
            model.version,
            params,
            None,
            now,
            chrono::Duration::hours(1),
        )
    }

    #[test]
    fn a_video_writes_a_poster_beside_it_and_an_image_writes_itself_only() {
        let mut job = job();
        let base = format!("jobs/t/{}", job.id);
        assert_eq!(job.artifact_keys(), [format!("{base}/output.png")]);
        job.params.format = crate::OutputFormat::Mp4;
        assert_eq!(job.artifact_keys(), [format!("{base}/output.mp4"), format!("{base}/poster.png")]);
    }

    #[test]
    fn a_successful_life() {
        let mut job = job();
        let start = job.created_at + chrono::Duration::milliseconds(250);
        job.transition(JobStatus::Running, start).unwrap();
        assert_eq!((job.attempts, job.started_at, job.timings.queue_ms), (1, Some(start), Some(250)));
        job.transition(JobStatus::Running, start).unwrap();
        assert_eq!(job.attempts, 2, "a restart counts an attempt");
        job.transition(JobStatus::Succeeded, start).unwrap();
        assert_eq!((job.progress, job.finished_at), (1.0, Some(start)));
        assert_eq!(job.revision, 0, "changes leave the revision to the writer");
    }

    #[test]
    fn illegal_transitions_change_nothing() {
        let mut job = job();
        let before = job.clone();
        assert!(job.transition(JobStatus::Succeeded, Utc::now()).is_err());
        assert_eq!(job, before);
        job.transition(JobStatus::Canceled, Utc::now()).unwrap();
        assert!(job.fail(JobErrorCode::Internal, "x", Utc::now()).is_err());
        assert!(job.error.is_none());
    }

    #[test]
    fn cancel_is_requested_only_of_running_jobs_and_once() {
        let mut job = job();
        assert!(!job.request_cancel());
        job.transition(JobStatus::Running, Utc::now()).unwrap();
        assert!(job.request_cancel());
        assert!(!job.request_cancel());
        assert!(job.cancel_requested);
    }
}

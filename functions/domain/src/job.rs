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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Anything else.
    Internal,
}

/// What went wrong, for a failed job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Milliseconds spent in each stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub render_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encode_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_ms: Option<u64>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
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
    /// How many times a runner has started it.
    pub attempts: u32,
    /// The client asked to cancel while it was running; the runner stops at the next step.
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    #[serde(default)]
    pub outputs: Vec<Output>,
    #[serde(default)]
    pub timings: Timings,
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
            webhook,
            status: JobStatus::Queued,
            progress: 0.0,
            cache_key,
            created_at: now,
            started_at: None,
            finished_at: None,
            expires_at: now + time_to_live,
            attempts: 0,
            cancel_requested: false,
            error: None,
            outputs: Vec::new(),
            timings: Timings::default(),
        }
    }

    /// The key under which the job's artifact with this extension is stored. Fixed by the job id,
    /// so a redelivered job overwrites its artifact instead of adding a second one.
    pub fn output_key(&self, extension: &str) -> String {
        format!("jobs/{}/{}/output.{extension}", self.tenant_id, self.id)
    }
}

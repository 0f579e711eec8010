//! Messages on the job queue: the contract between the API and the runner.

use kiln_domain::{Job, JobId, TenantId};
use serde::{Deserialize, Serialize};

/// "Render this job." The job record is the source of truth; the message only points at it,
/// so a stale or duplicated message is harmless (the runner's conditional start decides).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "render_job")]
pub struct JobMessage {
    /// Message schema version.
    pub v: u32,
    pub job_id: JobId,
    pub tenant_id: TenantId,
    pub model: String,
    pub model_version: String,
    /// The tenant's weight in fair share across tenants (absent: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// The job's priority (absent: normal).
    #[serde(default, skip_serializing_if = "kiln_domain::Priority::is_normal")]
    pub priority: kiln_domain::Priority,
    /// When the job was accepted: its age lifts its priority in a runner's choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl JobMessage {
    pub const VERSION: u32 = 1;

    pub fn for_job(job: &Job) -> Self {
        Self {
            v: Self::VERSION,
            job_id: job.id.clone(),
            tenant_id: job.tenant_id.clone(),
            model: job.model.clone(),
            model_version: job.model_version.clone(),
            weight: job.share_weight,
            priority: job.priority,
            created_at: Some(job.created_at),
        }
    }
}

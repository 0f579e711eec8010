//! Outboxes: where an inbox job's result lands. When a job started by an upload to the S3
//! inbox ends, its artifacts and a `result.json` (the job as `GET /v1/jobs/{id}` shows it,
//! without links) are written under each outbox the job records; an upload the API would
//! refuse gets an `error.json` there instead.

use bytes::Bytes;
use kiln_domain::Job;
use std::sync::Arc;
use tracing::info;

use crate::{
    AppError,
    ports::{ArtifactStore, ObjectStore},
    views::JobView,
    wiring::Ports,
};

/// Why an upload started no job, as `error.json` says it: the code, message and field the API
/// would have answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl From<&AppError> for Refusal {
    fn from(err: &AppError) -> Self {
        Self { code: err.code(), message: err.client_message(), field: err.field().map(str::to_owned) }
    }
}

/// Writes results and refusals into outboxes.
pub struct Outboxes {
    objects: Arc<dyn ObjectStore>,
    artifacts: Arc<dyn ArtifactStore>,
}

impl Outboxes {
    /// On the bucket's objects (copies) and artifacts (writes) of `ports`.
    pub fn new(ports: &Ports) -> Self {
        Self { objects: ports.objects.clone(), artifacts: ports.artifacts.clone() }
    }

    /// Copies the job's artifacts to `outbox` and writes `result.json` next to them. Rewriting
    /// is harmless, so a retried stream record may do it again.
    pub async fn write_result(&self, job: &Job, outbox: &str) -> Result<(), AppError> {
        for output in &job.outputs {
            let name = output.key.rsplit('/').next().unwrap_or("output");
            self.objects.copy(&output.key, &format!("{outbox}{name}")).await?;
        }
        let result = serde_json::to_vec_pretty(&JobView::new(job, &[])).unwrap_or_default();
        self.artifacts.put(&format!("{outbox}result.json"), "application/json", Bytes::from(result)).await?;
        info!(job_id = %job.id, outbox, status = %job.status, "outbox written");
        Ok(())
    }

    /// Writes `error.json` (`{"error": {code, message, field}}`) into `outbox`.
    pub async fn write_refusal(&self, outbox: &str, refusal: &Refusal) -> Result<(), AppError> {
        let body =
            serde_json::json!({"error": {"code": refusal.code, "message": refusal.message, "field": refusal.field}});
        self.artifacts.put(&format!("{outbox}error.json"), "application/json", Bytes::from(body.to_string())).await?;
        info!(outbox, code = refusal.code, "inbox job spec refused");
        Ok(())
    }
}

//! The `job-events` function: the jobs table's DynamoDB stream delivers it every change of every
//! job (old and new image). For each change it
//! - queues the webhook events the change raises (`kiln_domain::webhook_events`: started,
//!   progress, completed) on the SQS webhook queue, where `deliver-webhooks` takes them;
//! - when a job started by an inbox upload ends, copies its artifact and a `result.json` to each
//!   of its outboxes (`outbox/<tenant>/<name>/`).
//!
//! Why a stream and not a send from wherever the job changes: the event is recorded by the very
//! write that changes the job, so no crash between "job written" and "event sent" can lose it,
//! and the API, the runner, the sweeper and the dead-letter function need no webhook code.
//! Records are processed in order; a failure reports that record's sequence number so Lambda
//! retries from it (the event ids are stable, so receivers can drop a repeat).

use aws_lambda_events::{
    dynamodb::Event,
    streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse},
};
use bytes::Bytes;
use chrono::Utc;
use kiln_app::{
    AppError, Webhooks,
    ports::{ArtifactStore, ObjectStore},
};
use kiln_domain::Job;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use std::sync::Arc;
use tracing::{error, info, warn};

use crate::{ApiConfig, views::JobView};

/// The function's state.
pub struct JobEvents {
    pub webhooks: Webhooks,
    pub objects: Arc<dyn ObjectStore>,
    pub artifacts: Arc<dyn ArtifactStore>,
}

impl JobEvents {
    /// One change of one job. `after` is None when the job was deleted (its TTL ran out).
    pub async fn on_change(&self, before: Option<&Job>, after: Option<&Job>) -> Result<(), AppError> {
        let Some(after) = after else { return Ok(()) };
        self.webhooks.fan_out(before, after, Utc::now()).await?;
        let ended_now = after.status.is_terminal() && !before.is_some_and(|b| b.status.is_terminal());
        if ended_now {
            for outbox in &after.outboxes {
                self.write_outbox(after, outbox).await?;
            }
        }
        Ok(())
    }

    /// Copies the job's artifacts to `outbox` and writes `result.json` (the job as `GET
    /// /v1/jobs/{id}` shows it, without links) next to them. Rewriting is harmless.
    pub async fn write_outbox(&self, job: &Job, outbox: &str) -> Result<(), AppError> {
        for output in &job.outputs {
            let name = output.key.rsplit('/').next().unwrap_or("output");
            self.objects.copy(&output.key, &format!("{outbox}{name}")).await?;
        }
        let result = serde_json::to_vec_pretty(&JobView::new(job, &[])).unwrap_or_default();
        self.artifacts.put(&format!("{outbox}result.json"), "application/json", Bytes::from(result)).await?;
        info!(job_id = %job.id, outbox, status = %job.status, "outbox written");
        Ok(())
    }
}

/// Decodes a stream image; an empty one (an insert's old image) is None.
fn job_of(image: &serde_dynamo::Item) -> Result<Option<Job>, serde_dynamo::Error> {
    if image.is_empty() {
        return Ok(None);
    }
    serde_dynamo::from_item(image.clone()).map(Some)
}

/// Handles one batch in order; stops at the first record that fails and reports it, so Lambda
/// retries from there. A record that does not decode is logged and skipped (retrying cannot fix
/// it).
pub async fn handle(events: &JobEvents, event: LambdaEvent<Event>) -> Result<DynamoDbEventResponse, Error> {
    let mut response = DynamoDbEventResponse::default();
    for record in event.payload.records {
        let decoded = job_of(&record.change.old_image).and_then(|old| Ok((old, job_of(&record.change.new_image)?)));
        let (before, after) = match decoded {
            Ok(pair) => pair,
            Err(err) => {
                error!(event_id = %record.event_id, error = %err, "unreadable job image; skipping the record");
                continue;
            }
        };
        if let Err(err) = events.on_change(before.as_ref(), after.as_ref()).await {
            warn!(event_id = %record.event_id, error = %err, "job change not handled; it will be retried");
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = record.change.sequence_number.clone();
            response.batch_item_failures.push(failure);
            break;
        }
    }
    Ok(response)
}

/// The whole `main` of the job-events function.
pub async fn run() -> Result<(), Error> {
    crate::lambda::init_tracing();
    let config = <ApiConfig as clap::Parser>::try_parse_from(["job-events"])?;
    let events = Arc::new(JobEvents::from_config(&config).await);
    lambda_runtime::run(service_fn(move |event| {
        let events = events.clone();
        async move { handle(&events, event).await }
    }))
    .await
}

impl JobEvents {
    pub async fn from_config(config: &ApiConfig) -> Self {
        let clients = kiln_aws::AwsClients::connect(config.resources.endpoint_url.as_deref()).await;
        Self::on(&clients, config)
    }

    pub fn on(clients: &kiln_aws::AwsClients, config: &ApiConfig) -> Self {
        let r = &config.resources;
        let artifacts = Arc::new(kiln_aws::S3ArtifactStore::new(clients.s3.clone(), &r.artifacts_bucket));
        Self { webhooks: crate::webhooks_on(clients, config), objects: artifacts.clone(), artifacts }
    }
}

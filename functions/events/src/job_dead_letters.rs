//! `job-dead-letters`: SQS delivers it every message that reached the job queue's dead-letter
//! queue (all its deliveries failed, or its runners kept dying). It ends each such job as
//! failed (`dead_lettered`), so no job stays running or queued forever. A job that already
//! ended is left alone; an unreadable message is logged and dropped.

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent};
use chrono::Utc;
use kiln_app::{AppError, JobMessage, JobRuns, ports::Delivery};
use kiln_aws::AwsPorts;
use kiln_lambda::{
    Error, FunctionConfig, LambdaEvent,
    sqs::{BatchLimits, Processed, handle_event},
};
use std::sync::Arc;
use tracing::error;

/// The run records on the jobs table.
pub fn wire(aws: &AwsPorts) -> JobRuns {
    JobRuns::new(aws.job_store())
}

pub async fn setup(config: FunctionConfig) -> anyhow::Result<JobRuns> {
    Ok(wire(&AwsPorts::for_lambda(&config.resources)))
}

/// Fails the job one dead letter points at. `Err` (a DynamoDB error) leaves it on the queue.
pub async fn handle_message(runs: &JobRuns, message: &Delivery) -> Result<Processed, AppError> {
    let job: JobMessage = match serde_json::from_str(&message.body) {
        Ok(job) => job,
        Err(err) => {
            let excerpt: String = message.body.chars().take(200).collect();
            error!(error = %err, body = %excerpt, "unreadable dead letter; dropping it");
            return Ok(Processed::Done);
        }
    };
    tracing::Span::current().record("job_id", job.job_id.as_str());
    runs.dead_lettered(&job.job_id, &message.message_id, Utc::now()).await?;
    Ok(Processed::Done)
}

/// Handles one batch; messages whose job could not be updated come back.
pub async fn handle(runs: Arc<JobRuns>, event: LambdaEvent<SqsEvent>) -> Result<SqsBatchResponse, Error> {
    let runs = &runs;
    Ok(handle_event(event, BatchLimits::default(), |message| async move { handle_message(runs, &message).await }).await)
}

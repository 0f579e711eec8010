//! `job-events`: the jobs table's DynamoDB stream delivers it every change of every job (old
//! and new image); [`JobChanges`] queues the webhook events each raises and writes the outboxes
//! of inbox jobs that ended.
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
use chrono::Utc;
use kiln_app::changes::JobChanges;
use kiln_aws::AwsPorts;
use kiln_domain::Job;
use kiln_lambda::{Error, FunctionConfig, LambdaEvent};
use std::sync::Arc;
use tracing::{Instrument, error, field, info_span, warn};

/// Fan-out to the webhook queue, outboxes in the bucket: the function reads no table.
pub fn wire(aws: &AwsPorts) -> JobChanges {
    let ports = kiln_app::Ports {
        webhook_queue: aws.webhook_queue(),
        objects: aws.objects(),
        artifacts: aws.artifacts(),
        ..aws.none()
    };
    JobChanges::new(&ports)
}

pub async fn setup(config: FunctionConfig) -> anyhow::Result<JobChanges> {
    Ok(wire(&AwsPorts::for_lambda(&config.resources)))
}

/// Decodes a stream image; an empty one (an insert's old image) is None.
pub fn job_of(image: &serde_dynamo::Item) -> Result<Option<Job>, serde_dynamo::Error> {
    if image.is_empty() {
        return Ok(None);
    }
    serde_dynamo::from_item(image.clone()).map(Some)
}

/// Handles one batch in order; stops at the first record that fails and reports it, so Lambda
/// retries from there. A record that does not decode is logged and skipped (retrying cannot fix
/// it).
pub async fn handle(changes: Arc<JobChanges>, event: LambdaEvent<Event>) -> Result<DynamoDbEventResponse, Error> {
    let mut response = DynamoDbEventResponse::default();
    for record in event.payload.records {
        let span = info_span!("stream_record", event_id = %record.event_id, job_id = field::Empty);
        let decoded = job_of(&record.change.old_image).and_then(|old| Ok((old, job_of(&record.change.new_image)?)));
        let (before, after) = match decoded {
            Ok(pair) => pair,
            Err(err) => {
                span.in_scope(|| error!(error = %err, "unreadable job image; skipping the record"));
                continue;
            }
        };
        if let Some(job) = after.as_ref().or(before.as_ref()) {
            span.record("job_id", job.id.as_str());
        }
        let handled = changes.on_change(before.as_ref(), after.as_ref(), Utc::now()).instrument(span.clone()).await;
        if let Err(err) = handled {
            span.in_scope(|| warn!(error = %err, "job change not handled; it will be retried"));
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = record.change.sequence_number.clone();
            response.batch_item_failures.push(failure);
            break;
        }
    }
    Ok(response)
}

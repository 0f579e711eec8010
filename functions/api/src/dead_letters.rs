//! The `job-dead-letters` function: SQS delivers it every message that reached the job queue's
//! dead-letter queue (all its deliveries failed, or its runners kept dying). It ends each such
//! job as failed (`dead_lettered`), so no job stays running or queued forever. A job that
//! already ended is left alone; an unreadable message is logged and dropped.

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use chrono::Utc;
use kiln_app::JobMessage;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use std::sync::Arc;
use tracing::{error, warn};

use crate::{Api, ApiConfig};

/// Handles one batch. Records whose job could not be updated (a DynamoDB error) are reported
/// as failures, so SQS delivers them again; the rest are done.
pub async fn handle(api: &Api, event: LambdaEvent<SqsEvent>) -> Result<SqsBatchResponse, Error> {
    let mut response = SqsBatchResponse::default();
    for record in event.payload.records {
        if let Err(err) = handle_record(api, &record).await {
            warn!(message_id = ?record.message_id, error = %err, "dead letter not recorded; it will be retried");
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = record.message_id.clone().unwrap_or_default();
            response.batch_item_failures.push(failure);
        }
    }
    Ok(response)
}

/// Fails the job one dead letter points at. Returns whether the job changed.
pub async fn handle_record(api: &Api, record: &SqsMessage) -> Result<bool, kiln_app::AppError> {
    let body = record.body.as_deref().unwrap_or_default();
    let message: JobMessage = match serde_json::from_str(body) {
        Ok(message) => message,
        Err(err) => {
            error!(error = %err, body = %body.chars().take(200).collect::<String>(), "unreadable dead letter; dropping it");
            return Ok(false);
        }
    };
    api.runs().dead_lettered(&message.job_id, Utc::now()).await
}

/// The whole `main` of the dead-letter function.
pub async fn run() -> Result<(), Error> {
    crate::lambda::init_tracing();
    let config = <ApiConfig as clap::Parser>::try_parse_from(["job-dead-letters"])?;
    let api = Arc::new(Api::from_config(&config).await);
    lambda_runtime::run(service_fn(move |event| {
        let api = api.clone();
        async move { handle(&api, event).await }
    }))
    .await
}

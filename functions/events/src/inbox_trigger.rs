//! `inbox-trigger`: S3 tells it about every object created under `inbox/`; each is handed to
//! the [`Inbox`] use case (which starts the job, or writes `error.json`). Here: the S3 event's
//! shapes and its URL-encoded keys.

use aws_lambda_events::s3::S3Event;
use kiln_app::{AppError, inbox::Inbox, inbox::InboxOutcome};
use kiln_aws::AwsPorts;
use kiln_lambda::{Error, FunctionConfig, LambdaEvent};
use std::sync::Arc;
use tracing::{Instrument, info_span};

/// Submitting (tables, the job queue), reading uploads and writing outboxes (the bucket).
pub fn wire(aws: &AwsPorts, config: &FunctionConfig) -> Inbox {
    let ports = kiln_app::Ports {
        store: aws.job_store(),
        queue: aws.job_queue(),
        catalog: aws.catalog(),
        tenants: aws.tenants(),
        objects: aws.objects(),
        artifacts: aws.artifacts(),
        ..aws.none()
    };
    Inbox::new(&ports, config.jobs_config(), config.max_body_bytes)
}

pub async fn setup(config: FunctionConfig) -> anyhow::Result<Inbox> {
    Ok(wire(&AwsPorts::for_lambda(&config.resources), &config))
}

/// Keys in S3 events are URL-encoded, with `+` for spaces.
pub fn decode_key(raw: &str) -> String {
    url::form_urlencoded::parse(format!("k={raw}").as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_else(|| raw.to_owned())
}

async fn on_notified(
    inbox: &Inbox,
    raw_key: &str,
    version: Option<&str>,
    etag: Option<&str>,
) -> Result<InboxOutcome, AppError> {
    let key = decode_key(raw_key);
    let span = info_span!("inbox_object", key = %key);
    inbox.on_object(&key, version, etag).instrument(span).await
}

/// Every record of an S3 event. `Err` makes S3 (or the relay) deliver the event again.
pub async fn on_event(inbox: &Inbox, event: &S3Event) -> Result<Vec<InboxOutcome>, AppError> {
    let mut outcomes = Vec::new();
    for record in &event.records {
        let object = &record.s3.object;
        let Some(raw) = object.key.as_deref() else {
            outcomes.push(InboxOutcome::Ignored("no key".into()));
            continue;
        };
        outcomes.push(on_notified(inbox, raw, object.version_id.as_deref(), object.e_tag.as_deref()).await?);
    }
    Ok(outcomes)
}

/// An S3 notification as raw JSON (`{"Records": [{"s3": {"object": {...}}}]}`), for deliveries
/// through SQS, whose senders may leave out fields the Lambda event type requires. A test event
/// (no records) does nothing.
pub async fn on_notification(inbox: &Inbox, notification: &serde_json::Value) -> Result<Vec<InboxOutcome>, AppError> {
    let mut outcomes = Vec::new();
    for record in notification["Records"].as_array().into_iter().flatten() {
        let object = &record["s3"]["object"];
        let Some(raw) = object["key"].as_str() else { continue };
        outcomes.push(on_notified(inbox, raw, object["versionId"].as_str(), object["eTag"].as_str()).await?);
    }
    Ok(outcomes)
}

pub async fn handle(inbox: Arc<Inbox>, event: LambdaEvent<S3Event>) -> Result<(), Error> {
    on_event(&inbox, &event.payload).await?;
    Ok(())
}

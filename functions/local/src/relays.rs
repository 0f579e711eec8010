//! What AWS does between our functions, done locally against moto: event source mappings and
//! notifications. Each relay reads the real source (an SQS queue, a DynamoDB stream) over HTTP
//! and calls the same handler the Lambda function runs.
//!
//! - job queue's DLQ → `job-dead-letters`
//! - jobs table stream → `job-events` (webhook events, outboxes)
//! - webhook queue → `deliver-webhooks`
//! - bucket notification (`inbox/`, to an SQS queue here; straight to Lambda in AWS) → `inbox-trigger`

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use chrono::Utc;
use kiln_app::{changes::JobChanges, inbox::Inbox};
use kiln_lambda::LambdaEvent;
use std::{future::Future, sync::Arc, time::Duration};
use tokio::task::JoinHandle;
use tracing::warn;

/// What Lambda's SQS event source mapping does: polls `queue_url` for up to 10 messages, hands
/// them to `handle` as one batch, and deletes the messages it did not report as failures.
pub fn relay_queue<F, Fut>(sqs: aws_sdk_sqs::Client, queue_url: String, handle: F) -> JoinHandle<()>
where
    F: Fn(SqsEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = SqsBatchResponse> + Send,
{
    tokio::spawn(async move {
        loop {
            let received = sqs
                .receive_message()
                .queue_url(&queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
                .send()
                .await;
            let Ok(received) = received else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            let messages = received.messages.unwrap_or_default();
            if messages.is_empty() {
                continue;
            }
            let mut event = SqsEvent::default();
            event.records = messages.iter().map(sqs_record).collect();
            let failed = handle(event).await;
            for message in messages {
                let id = message.message_id.unwrap_or_default();
                if failed.batch_item_failures.iter().any(|f| f.item_identifier == id) {
                    continue;
                }
                if let Some(receipt) = message.receipt_handle {
                    let _ = sqs.delete_message().queue_url(&queue_url).receipt_handle(receipt).send().await;
                }
            }
        }
    })
}

/// An SQS message as the Lambda event carries it.
pub fn sqs_record(message: &aws_sdk_sqs::types::Message) -> SqsMessage {
    let mut record = SqsMessage::default();
    record.message_id = message.message_id.clone();
    record.receipt_handle = message.receipt_handle.clone();
    record.body = message.body.clone();
    record.attributes = message
        .attributes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(name, value)| (name.as_str().to_owned(), value))
        .collect();
    record
}

/// An SQS-triggered function's handler, called as Lambda calls it (with its timeout).
pub fn relay_function<S, F, Fut>(
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    state: Arc<S>,
    timeout: Duration,
    handler: F,
) -> JoinHandle<()>
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, LambdaEvent<SqsEvent>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<SqsBatchResponse, kiln_lambda::Error>> + Send,
{
    relay_queue(sqs, queue_url, move |event| {
        let ids: Vec<String> = event.records.iter().filter_map(|r| r.message_id.clone()).collect();
        let answer = handler(state.clone(), LambdaEvent::new(event, kiln_lambda::local_context(timeout)));
        async move {
            answer.await.unwrap_or_else(|err| {
                warn!(error = %err, "invocation failed; every message comes back");
                let mut all = SqsBatchResponse::default();
                for id in ids {
                    let mut failure = aws_lambda_events::sqs::BatchItemFailure::default();
                    failure.item_identifier = id;
                    all.batch_item_failures.push(failure);
                }
                all
            })
        }
    })
}

/// S3 notifications (delivered to an SQS queue by moto) → the inbox handler; a notification
/// whose handling failed comes back.
pub fn relay_inbox(sqs: aws_sdk_sqs::Client, queue_url: String, inbox: Arc<Inbox>) -> JoinHandle<()> {
    relay_queue(sqs, queue_url, move |event| {
        let inbox = inbox.clone();
        async move {
            let mut response = SqsBatchResponse::default();
            for message in event.records {
                let body = message.body.unwrap_or_default();
                // S3 sends a test event when the notification is set up; it has no records.
                let Ok(notification) = serde_json::from_str::<serde_json::Value>(&body) else { continue };
                if let Err(err) = kiln_events::inbox_trigger::on_notification(&inbox, &notification).await {
                    warn!(error = %err, "inbox event failed; it will be retried");
                    let mut failure = aws_lambda_events::sqs::BatchItemFailure::default();
                    failure.item_identifier = message.message_id.unwrap_or_default();
                    response.batch_item_failures.push(failure);
                }
            }
            response
        }
    })
}

/// The jobs table's stream → the job-events handler, in order, from the stream's start.
pub fn relay_job_stream(endpoint_url: &str, table: String, events: Arc<JobChanges>) -> JoinHandle<()> {
    let endpoint_url = endpoint_url.to_owned();
    tokio::spawn(async move {
        let sdk = kiln_aws::load_sdk_config(Some(&endpoint_url)).await;
        let streams = aws_sdk_dynamodbstreams::Client::new(&sdk);
        let mut iterators: std::collections::BTreeMap<String, Option<String>> = Default::default();
        loop {
            if let Err(err) = poll_streams(&streams, &table, &mut iterators, &events).await {
                warn!(error = %err, "job stream relay");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

async fn poll_streams(
    streams: &aws_sdk_dynamodbstreams::Client,
    table: &str,
    iterators: &mut std::collections::BTreeMap<String, Option<String>>,
    events: &JobChanges,
) -> anyhow::Result<()> {
    let listed = streams.list_streams().table_name(table).send().await?;
    for stream in listed.streams.unwrap_or_default() {
        let Some(arn) = stream.stream_arn else { continue };
        let described = streams.describe_stream().stream_arn(&arn).send().await?;
        let shards = described.stream_description.and_then(|d| d.shards).unwrap_or_default();
        for shard in shards {
            let Some(shard_id) = shard.shard_id else { continue };
            let key = format!("{arn}/{shard_id}");
            let iterator = match iterators.get(&key) {
                Some(Some(iterator)) => iterator.clone(),
                Some(None) => continue, // closed
                None => {
                    let got = streams
                        .get_shard_iterator()
                        .stream_arn(&arn)
                        .shard_id(&shard_id)
                        .shard_iterator_type(ShardIteratorType::TrimHorizon)
                        .send()
                        .await?;
                    match got.shard_iterator {
                        Some(iterator) => iterator,
                        None => continue,
                    }
                }
            };
            let records = streams.get_records().shard_iterator(&iterator).send().await?;
            for record in records.records.unwrap_or_default() {
                let Some((before, after)) = kiln_events::replay::change_of(record) else {
                    warn!("unreadable job image in the stream; skipped");
                    continue;
                };
                // A failure is retried until it succeeds, as Lambda does with a stream.
                while let Err(err) = events.on_change(before.as_ref(), after.as_ref(), Utc::now()).await {
                    warn!(error = %err, "job change not handled; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            iterators.insert(key, records.next_shard_iterator);
        }
    }
    Ok(())
}

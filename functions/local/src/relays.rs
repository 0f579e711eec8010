//! What AWS does between our functions, done locally against moto: event source mappings and
//! notifications. Each relay reads the real source (an SQS queue, a DynamoDB stream) over HTTP
//! and calls the same handler the Lambda function runs.
//!
//! - job queue's DLQ → `job-dead-letters`
//! - jobs table stream → `job-events` (webhook events, outboxes)
//! - webhook queue → `deliver-webhooks`
//! - bucket notification (`inbox/`, to an SQS queue here; straight to Lambda in AWS) → `inbox-trigger`

use aws_lambda_events::sqs::SqsMessage;
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use kiln_api::{deliver::Deliverer, inbox::Inbox, job_events::JobEvents};
use kiln_aws::AwsClients;
use kiln_domain::Job;
use std::{future::Future, sync::Arc, time::Duration};
use tokio::task::JoinHandle;
use tracing::warn;

/// Polls `queue_url` and hands each message to `handle`; deletes it when `handle` says done.
pub fn relay_queue<F, Fut>(sqs: aws_sdk_sqs::Client, queue_url: String, handle: F) -> JoinHandle<()>
where
    F: Fn(SqsMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
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
            for message in received.messages.unwrap_or_default() {
                let mut record = SqsMessage::default();
                record.message_id = message.message_id.clone();
                record.receipt_handle = message.receipt_handle.clone();
                record.body = message.body.clone();
                record.attributes = message
                    .attributes
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(name, value)| (name.as_str().to_owned(), value))
                    .collect();
                if handle(record).await
                    && let Some(receipt) = message.receipt_handle
                {
                    let _ = sqs.delete_message().queue_url(&queue_url).receipt_handle(receipt).send().await;
                }
            }
        }
    })
}

/// The webhook queue → the delivery handler (a message it reports for later stays, hidden for
/// the delay the handler set).
pub fn relay_webhooks(clients: &AwsClients, queue_url: String, deliverer: Arc<Deliverer>) -> JoinHandle<()> {
    relay_queue(clients.sqs.clone(), queue_url, move |message| {
        let deliverer = deliverer.clone();
        async move { matches!(deliverer.handle_message(&message).await, Ok(kiln_api::deliver::Handled::Finished)) }
    })
}

/// S3 notifications (delivered to an SQS queue by moto) → the inbox handler.
pub fn relay_inbox(clients: &AwsClients, queue_url: String, inbox: Arc<Inbox>) -> JoinHandle<()> {
    relay_queue(clients.sqs.clone(), queue_url, move |message| {
        let inbox = inbox.clone();
        async move {
            let body = message.body.unwrap_or_default();
            // S3 sends a test event when the notification is set up; it has no records.
            let Ok(notification) = serde_json::from_str::<serde_json::Value>(&body) else { return true };
            match inbox.on_notification(&notification).await {
                Ok(_) => true,
                Err(err) => {
                    warn!(error = %err, "inbox event failed; it will be retried");
                    false
                }
            }
        }
    })
}

/// The jobs table's stream → the job-events handler, in order, from the stream's start.
pub fn relay_job_stream(endpoint_url: &str, table: String, events: Arc<JobEvents>) -> JoinHandle<()> {
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
    events: &JobEvents,
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
                let Some(change) = record.dynamodb else { continue };
                let decode = |image: Option<
                    std::collections::HashMap<String, aws_sdk_dynamodbstreams::types::AttributeValue>,
                >| {
                    image
                        .filter(|i| !i.is_empty())
                        .map(|i| serde_dynamo::from_item::<_, Job>(serde_dynamo::Item::from(i)))
                        .transpose()
                };
                let (before, after) = match (decode(change.old_image), decode(change.new_image)) {
                    (Ok(before), Ok(after)) => (before, after),
                    _ => {
                        warn!("unreadable job image in the stream; skipped");
                        continue;
                    }
                };
                // A failure is retried until it succeeds, as Lambda does with a stream.
                while let Err(err) = events.on_change(before.as_ref(), after.as_ref()).await {
                    warn!(error = %err, "job change not handled; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            iterators.insert(key, records.next_shard_iterator);
        }
    }
    Ok(())
}

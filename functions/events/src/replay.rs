//! Replaying what Lambda gave up on. The `job-events` stream mapping (after its retries, with
//! bisection) and the asynchronous `inbox-trigger` invocations (after theirs) send a record of
//! each failure to an SQS queue (`job-events-failures`, `inbox-failures`); an alarm fires while
//! one holds anything. An operator fixes the cause and runs `kiln-replay`, which hands each
//! failure to the same use case the function runs and deletes it once handled:
//!
//! - an inbox failure carries the S3 event itself (`requestPayload`): the objects are read
//!   again and their jobs started (idempotently: an object already started is not started twice);
//! - a stream failure carries the shard and the sequence numbers of the batch
//!   (`DDBStreamBatchInfo`): the records are read back from the stream (which keeps them 24
//!   hours) and each change handled again (the webhook event ids are stable, so a receiver
//!   drops what it already had).
//!
//! A failure that fails again stays on the queue (invisible until its visibility timeout) and is
//! counted.

use anyhow::Context;
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use chrono::Utc;
use kiln_app::{changes::JobChanges, inbox::Inbox};
use kiln_domain::Job;
use serde::Deserialize;
use std::collections::HashMap;
use tracing::{info, warn};

/// What one run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Failures handled and deleted.
    pub replayed: usize,
    /// Failures that failed again (left on the queue).
    pub failed: usize,
}

/// The part of a Lambda destination record a replay needs.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FailureRecord {
    /// Asynchronous invocations: the event as the function got it.
    #[serde(default)]
    request_payload: Option<serde_json::Value>,
    /// Stream mappings: where the failed batch lies in the stream.
    #[serde(default, rename = "DDBStreamBatchInfo")]
    stream_batch: Option<StreamBatch>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StreamBatch {
    shard_id: String,
    start_sequence_number: String,
    end_sequence_number: String,
    stream_arn: String,
}

/// Decodes a stream record's images into the job before and after the change; None when an
/// image does not decode (retrying cannot fix it).
pub fn change_of(record: aws_sdk_dynamodbstreams::types::Record) -> Option<(Option<Job>, Option<Job>)> {
    let change = record.dynamodb?;
    let decode = |image: Option<HashMap<String, aws_sdk_dynamodbstreams::types::AttributeValue>>| {
        image
            .filter(|image| !image.is_empty())
            .map(|image| serde_dynamo::from_item::<_, Job>(serde_dynamo::Item::from(image)))
            .transpose()
    };
    match (decode(change.old_image), decode(change.new_image)) {
        (Ok(before), Ok(after)) => Some((before, after)),
        _ => None,
    }
}

/// Replays every failure on the inbox failures queue.
pub async fn replay_inbox(sqs: &aws_sdk_sqs::Client, queue_url: &str, inbox: &Inbox) -> anyhow::Result<Replayed> {
    drain(sqs, queue_url, async |record: FailureRecord| {
        let payload = record.request_payload.context("an inbox failure without its requestPayload")?;
        let outcomes = crate::inbox_trigger::on_notification(inbox, &payload).await?;
        info!(?outcomes, "inbox event replayed");
        Ok(())
    })
    .await
}

/// Replays every failure on the job-events failures queue from the jobs table's stream.
pub async fn replay_job_events(
    sqs: &aws_sdk_sqs::Client,
    streams: &aws_sdk_dynamodbstreams::Client,
    queue_url: &str,
    changes: &JobChanges,
) -> anyhow::Result<Replayed> {
    drain(sqs, queue_url, async |record: FailureRecord| {
        let batch = record.stream_batch.context("a stream failure without its DDBStreamBatchInfo")?;
        let end: u128 = batch.end_sequence_number.parse().context("endSequenceNumber")?;
        let mut iterator = streams
            .get_shard_iterator()
            .stream_arn(&batch.stream_arn)
            .shard_id(&batch.shard_id)
            .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
            .sequence_number(&batch.start_sequence_number)
            .send()
            .await
            .context("reading the stream back (it keeps records 24 hours)")?
            .shard_iterator;
        let mut handled = 0;
        'shard: while let Some(at) = iterator {
            let page = streams.get_records().shard_iterator(at).send().await?;
            let records = page.records.unwrap_or_default();
            if records.is_empty() {
                break;
            }
            for record in records {
                let sequence = record.dynamodb.as_ref().and_then(|d| d.sequence_number.as_deref()).unwrap_or("0");
                if sequence.parse::<u128>().unwrap_or(0) > end {
                    break 'shard;
                }
                let Some((before, after)) = change_of(record) else {
                    warn!("unreadable job image in the stream; skipped");
                    continue;
                };
                changes.on_change(before.as_ref(), after.as_ref(), Utc::now()).await?;
                handled += 1;
            }
            iterator = page.next_shard_iterator;
        }
        info!(records = handled, shard = %batch.shard_id, "stream batch replayed");
        Ok(())
    })
    .await
}

/// Receives every message of the queue once: handled ones are deleted, failing ones left.
async fn drain<F>(sqs: &aws_sdk_sqs::Client, queue_url: &str, handle: F) -> anyhow::Result<Replayed>
where
    F: AsyncFn(FailureRecord) -> anyhow::Result<()>,
{
    let mut done = Replayed::default();
    loop {
        let received = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .visibility_timeout(300)
            .wait_time_seconds(1)
            .send()
            .await
            .context("receiving failures")?;
        let messages = received.messages.unwrap_or_default();
        if messages.is_empty() {
            return Ok(done);
        }
        for message in messages {
            let handled = match serde_json::from_str::<FailureRecord>(message.body().unwrap_or_default()) {
                Ok(record) => handle(record).await,
                Err(err) => Err(anyhow::Error::new(err).context("not a Lambda destination record")),
            };
            match handled {
                Ok(()) => {
                    let receipt = message.receipt_handle().unwrap_or_default();
                    sqs.delete_message().queue_url(queue_url).receipt_handle(receipt).send().await?;
                    done.replayed += 1;
                }
                Err(err) => {
                    warn!(error = format!("{err:#}"), message_id = ?message.message_id(), "replay failed; left on the queue");
                    done.failed += 1;
                }
            }
        }
    }
}

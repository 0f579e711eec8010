//! The job queue on SQS: the API's side (send) and the runner's (receive, heartbeat, hand back,
//! acknowledge).

use async_trait::async_trait;
use aws_sdk_sqs::{
    Client,
    types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName, SendMessageBatchRequestEntry},
};
use kiln_app::{
    JobMessage,
    ports::{Delivery, JobQueue, PortError, WorkQueue},
};
use std::time::Duration;

use crate::unavailable;

#[derive(Clone)]
pub struct SqsJobQueue {
    client: Client,
    queue_url: String,
}

impl SqsJobQueue {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self { client, queue_url: queue_url.into() }
    }
}

#[async_trait]
impl JobQueue for SqsJobQueue {
    /// In the tenant's message group: on AWS, SQS fair queues then keep a quiet tenant's jobs
    /// ahead of a noisy tenant's backlog (moto keeps the group and ignores it).
    async fn enqueue(&self, message: &JobMessage) -> Result<(), PortError> {
        let body = serde_json::to_string(message).map_err(unavailable("sqs"))?;
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .message_group_id(message.tenant_id.as_str())
            .send()
            .await
            .map_err(unavailable("sqs"))?;
        Ok(())
    }
}

/// Sends `message` as one JSON message.
async fn send_json(client: &Client, queue_url: &str, message: &impl serde::Serialize) -> Result<(), PortError> {
    let body = serde_json::to_string(message).map_err(unavailable("sqs"))?;
    client.send_message().queue_url(queue_url).message_body(body).send().await.map_err(unavailable("sqs"))?;
    Ok(())
}

/// The runner's side of the SQS job queue.
#[derive(Clone)]
pub struct SqsWorkQueue {
    client: Client,
    queue_url: String,
}

impl SqsWorkQueue {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self { client, queue_url: queue_url.into() }
    }
}

/// SQS takes visibility timeouts in whole seconds, at most 12 hours.
fn seconds(duration: Duration) -> i32 {
    duration.as_secs().min(12 * 3600) as i32
}

#[async_trait]
impl WorkQueue for SqsWorkQueue {
    async fn receive(&self, max: u32, wait: Duration, lease: Duration) -> Result<Vec<Delivery>, PortError> {
        let output = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .visibility_timeout(seconds(lease))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .send()
            .await
            .map_err(unavailable("sqs"))?;
        let deliveries = output
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|message| {
                let attributes = message.attributes.unwrap_or_default();
                let attribute = |name| attributes.get(&name).and_then(|v| v.parse::<i64>().ok());
                Some(Delivery {
                    message_id: message.message_id.unwrap_or_default(),
                    body: message.body.unwrap_or_default(),
                    receipt: message.receipt_handle?,
                    receive_count: attribute(MessageSystemAttributeName::ApproximateReceiveCount).unwrap_or(1) as u32,
                    sent_at: attribute(MessageSystemAttributeName::SentTimestamp)
                        .and_then(chrono::DateTime::from_timestamp_millis),
                })
            })
            .collect();
        Ok(deliveries)
    }

    async fn extend(&self, receipt: &str, lease: Duration) -> Result<(), PortError> {
        set_visibility(&self.client, &self.queue_url, receipt, lease).await
    }

    async fn release(&self, receipt: &str, delay: Duration) -> Result<(), PortError> {
        set_visibility(&self.client, &self.queue_url, receipt, delay).await
    }

    async fn delete(&self, receipt: &str) -> Result<(), PortError> {
        self.client
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(unavailable("sqs"))?;
        Ok(())
    }

    async fn requeue(&self, deliveries: &[(Delivery, String)], delay: Duration) -> Result<(), PortError> {
        for batch in deliveries.chunks(10) {
            let mut sends = Vec::with_capacity(batch.len());
            for (index, (delivery, group)) in batch.iter().enumerate() {
                let entry = SendMessageBatchRequestEntry::builder()
                    .id(index.to_string())
                    .message_body(&delivery.body)
                    .message_group_id(group)
                    .delay_seconds(delay.as_secs().min(900) as i32)
                    .build()
                    .map_err(unavailable("sqs"))?;
                sends.push(entry);
            }
            let sent = self
                .client
                .send_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(sends))
                .send()
                .await
                .map_err(unavailable("sqs"))?;
            let mut deletes = Vec::with_capacity(batch.len());
            for ok in sent.successful {
                let Some((delivery, _)) = ok.id.parse::<usize>().ok().and_then(|index| batch.get(index)) else {
                    continue;
                };
                let entry = DeleteMessageBatchRequestEntry::builder()
                    .id(ok.id)
                    .receipt_handle(&delivery.receipt)
                    .build()
                    .map_err(unavailable("sqs"))?;
                deletes.push(entry);
            }
            if !deletes.is_empty() {
                self.client
                    .delete_message_batch()
                    .queue_url(&self.queue_url)
                    .set_entries(Some(deletes))
                    .send()
                    .await
                    .map_err(unavailable("sqs"))?;
            }
        }
        Ok(())
    }
}

/// Hides a received message for `timeout` from now (zero: visible again at once).
async fn set_visibility(client: &Client, queue_url: &str, receipt: &str, timeout: Duration) -> Result<(), PortError> {
    client
        .change_message_visibility()
        .queue_url(queue_url)
        .receipt_handle(receipt)
        .visibility_timeout(seconds(timeout))
        .send()
        .await
        .map_err(unavailable("sqs"))?;
    Ok(())
}

/// The SQS webhook queue: one message per job event, drained by `deliver-webhooks`.
#[derive(Clone)]
pub struct SqsWebhookQueue {
    client: Client,
    queue_url: String,
}

impl SqsWebhookQueue {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self { client, queue_url: queue_url.into() }
    }
}

#[async_trait]
impl kiln_app::ports::WebhookQueue for SqsWebhookQueue {
    async fn send(&self, event: &kiln_domain::JobEvent) -> Result<(), PortError> {
        send_json(&self.client, &self.queue_url, event).await
    }

    /// Hides a received message for `delay` (the retry backoff; SQS allows at most 12 hours); a
    /// batch item failure then leaves it to come back after that.
    async fn delay(&self, receipt: &str, delay: Duration) -> Result<(), PortError> {
        set_visibility(&self.client, &self.queue_url, receipt, delay).await
    }
}

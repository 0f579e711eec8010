//! The `deliver-webhooks` function: SQS hands it the job events waiting on the webhook queue.
//! Each is POSTed as `{type, timestamp, job}` (the job as `GET /v1/jobs/{id}` shows it, with
//! fresh download links), signed per Standard Webhooks with the tenant's secrets, through
//! `kiln-webhooks` (address guard, timeouts, capped bodies). Then:
//! - delivered (2xx) or refused for good (another 4xx): recorded on the job, message deleted;
//! - worth retrying (timeout, connection error, 5xx, 408, 429): recorded, the message hidden for
//!   the schedule's next delay (exponential with jitter, hours in all; a `Retry-After` is a lower
//!   bound) and reported as a batch item failure, so SQS hands it back then;
//! - the schedule's last attempt failed: recorded as abandoned and left to the queue's redrive,
//!   which moves it to the webhook DLQ on its next receive (`maxReceiveCount` = the schedule's
//!   attempts).

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use chrono::Utc;
use kiln_app::{AppError, AttemptOutcome, AttemptRecord, Jobs, Webhooks};
use kiln_aws::SqsWebhookQueue;
use kiln_domain::JobEvent;
use kiln_webhooks::{DeliveryRequest, NextStep, RetrySchedule, Secret, WebhookSender, jitter_seed};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use std::{sync::Arc, time::Duration};
use tracing::{error, info, warn};

use crate::{ApiConfig, views::JobView};

pub struct Deliverer {
    pub webhooks: Webhooks,
    pub jobs: Jobs,
    pub sender: WebhookSender,
    pub schedule: RetrySchedule,
    pub queue: SqsWebhookQueue,
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Done with it: delete.
    Finished,
    /// Hidden until its next attempt: report as a batch item failure.
    Later,
}

impl Deliverer {
    pub async fn handle_message(&self, message: &SqsMessage) -> Result<Handled, AppError> {
        let body = message.body.as_deref().unwrap_or_default();
        let event: JobEvent = match serde_json::from_str(body) {
            Ok(event) => event,
            Err(err) => {
                error!(error = %err, "unreadable webhook message; dropping it");
                return Ok(Handled::Finished);
            }
        };
        let Some(webhook) = event.job.webhook.clone() else { return Ok(Handled::Finished) };
        let attempt: u32 = message.attributes.get("ApproximateReceiveCount").and_then(|n| n.parse().ok()).unwrap_or(1);
        let now = Utc::now();
        let secrets: Vec<Secret> = self
            .webhooks
            .signing_secrets(&event.job.tenant_id, now)
            .await?
            .iter()
            .filter_map(|text| Secret::parse(text).ok())
            .collect();
        let read = self.jobs.with_links(event.job.clone()).await?;
        let payload = serde_json::json!({
            "type": event.kind.as_str(),
            "timestamp": event.timestamp,
            "job": JobView::with_links(&read),
        });
        let request = DeliveryRequest {
            url: webhook.url.clone(),
            message_id: event.id.clone(),
            body: serde_json::to_vec(&payload).unwrap_or_default().into(),
            secrets,
        };
        let result = self.sender.deliver(&request).await;
        let step = self.schedule.next_step(attempt, &result.outcome, jitter_seed(&event.id));
        let outcome = match step {
            NextStep::Done => AttemptOutcome::Delivered,
            NextStep::RetryIn(_) => AttemptOutcome::Retrying,
            NextStep::GiveUp | NextStep::Exhausted => AttemptOutcome::Abandoned,
        };
        let record = AttemptRecord {
            event_id: event.id.clone(),
            at: now,
            status: result.status,
            error: result.error.clone(),
            outcome,
        };
        self.webhooks.record_attempt(&event.job.id, &record).await?;
        info!(job_id = %event.job.id, event_id = %event.id, attempt, status = ?result.status, error = ?result.error, step = ?step, "webhook attempt");
        match step {
            NextStep::Done | NextStep::GiveUp => Ok(Handled::Finished),
            NextStep::RetryIn(delay) => {
                if let Some(receipt) = message.receipt_handle.as_deref() {
                    self.queue.delay(receipt, delay).await?;
                }
                Ok(Handled::Later)
            }
            NextStep::Exhausted => {
                // Back at once, so the redrive moves it to the DLQ on the next receive.
                if let Some(receipt) = message.receipt_handle.as_deref() {
                    self.queue.delay(receipt, Duration::ZERO).await?;
                }
                Ok(Handled::Later)
            }
        }
    }
}

pub async fn handle(deliverer: &Deliverer, event: LambdaEvent<SqsEvent>) -> Result<SqsBatchResponse, Error> {
    let mut response = SqsBatchResponse::default();
    for record in event.payload.records {
        let later = match deliverer.handle_message(&record).await {
            Ok(Handled::Finished) => false,
            Ok(Handled::Later) => true,
            Err(err) => {
                warn!(message_id = ?record.message_id, error = %err, "webhook message not handled; it will come back");
                true
            }
        };
        if later {
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = record.message_id.clone().unwrap_or_default();
            response.batch_item_failures.push(failure);
        }
    }
    Ok(response)
}

/// The delivery settings, from the environment.
#[derive(Debug, Clone, clap::Parser)]
pub struct DeliveryConfig {
    #[command(flatten)]
    pub api: ApiConfig,
    /// First retry delay, in seconds; doubles per attempt (with jitter) up to the cap.
    #[arg(long, env = "KILN_WEBHOOK_RETRY_BASE_SECS", default_value_t = 30)]
    pub retry_base_secs: u64,
    /// Longest delay between two attempts, in seconds (SQS allows up to 12 hours).
    #[arg(long, env = "KILN_WEBHOOK_RETRY_CAP_SECS", default_value_t = 21_600)]
    pub retry_cap_secs: u64,
    /// Attempts per event before it goes to the dead-letter queue; the webhook queue's
    /// maxReceiveCount (terraform/stack.json) must equal it.
    #[arg(long, env = "KILN_WEBHOOK_MAX_ATTEMPTS", default_value_t = 14)]
    pub max_attempts: u32,
    /// Seconds to wait for a connection, and for the whole response.
    #[arg(long, env = "KILN_WEBHOOK_CONNECT_TIMEOUT_SECS", default_value_t = 5)]
    pub connect_timeout_secs: u64,
    #[arg(long, env = "KILN_WEBHOOK_TIMEOUT_SECS", default_value_t = 15)]
    pub timeout_secs: u64,
    /// Local development only: allow http:// and loopback receivers.
    #[arg(long, env = "KILN_WEBHOOK_ALLOW_LOOPBACK", default_value_t = false)]
    pub allow_loopback: bool,
}

impl Deliverer {
    pub fn on(clients: &kiln_aws::AwsClients, config: &DeliveryConfig) -> anyhow::Result<Self> {
        let api = &config.api;
        let ports = crate::Ports::aws(clients, api);
        let sender_config = kiln_webhooks::SenderConfig {
            connect_timeout: Duration::from_secs(config.connect_timeout_secs),
            response_timeout: Duration::from_secs(config.timeout_secs),
            allow_http: config.allow_loopback,
            allow_loopback: config.allow_loopback,
            ..kiln_webhooks::SenderConfig::default()
        };
        Ok(Self {
            webhooks: crate::webhooks_on(clients, api),
            jobs: Jobs::new(ports.store, ports.queue, ports.catalog, ports.links, api.jobs_config()),
            sender: WebhookSender::new(sender_config),
            schedule: RetrySchedule::new(
                Duration::from_secs(config.retry_base_secs),
                Duration::from_secs(config.retry_cap_secs),
                config.max_attempts,
                // Equal jitter keeps the whole schedule between about 13 and 26 hours.
                kiln_webhooks::Jitter::Equal,
            )?,
            queue: SqsWebhookQueue::new(clients.sqs.clone(), &api.resources.webhook_queue_url),
        })
    }
}

/// The whole `main` of the delivery function.
pub async fn run() -> Result<(), Error> {
    crate::lambda::init_tracing();
    let config = <DeliveryConfig as clap::Parser>::try_parse_from(["deliver-webhooks"])?;
    let clients = kiln_aws::AwsClients::connect(config.api.resources.endpoint_url.as_deref()).await;
    let deliverer = Arc::new(Deliverer::on(&clients, &config)?);
    lambda_runtime::run(service_fn(move |event| {
        let deliverer = deliverer.clone();
        async move { handle(&deliverer, event).await }
    }))
    .await
}

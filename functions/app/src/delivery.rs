//! Delivering one webhook event from the webhook queue: sign it with the tenant's secrets, make
//! one attempt through the [`WebhookTransport`], record the attempt on the job, and decide what
//! becomes of the message:
//! - delivered (2xx) or refused for good (another 4xx): recorded, finished (delete it);
//! - worth retrying (timeout, connection error, 5xx, 408, 429): recorded, hidden for the
//!   schedule's next delay (exponential with jitter, hours in all; a `Retry-After` is a lower
//!   bound) and reported for later, so the queue hands it back then;
//! - the schedule's last attempt failed: recorded as abandoned and handed back at once, so the
//!   queue's redrive moves it to the webhook DLQ on its next receive (the queue's
//!   `maxReceiveCount` equals the schedule's attempts).
//!
//! The body is `{type, timestamp, job}`, the job as `GET /v1/jobs/{id}` shows it, with fresh
//! download links.

use chrono::Utc;
use kiln_domain::JobEvent;
use kiln_webhooks::{DeliveryRequest, NextStep, RetrySchedule, Secret, jitter_seed};
use std::{sync::Arc, time::Duration};
use tracing::{error, info};

use crate::{
    AppError, AttemptOutcome, AttemptRecord, Jobs, JobsConfig, Webhooks,
    ports::{Delivery, WebhookQueue, WebhookTransport},
    views::JobView,
    wiring::Ports,
};

/// What became of one queued event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Done with it: delete it.
    Finished,
    /// Hidden until its next attempt: report it as a batch item failure, leave it on the queue.
    Later,
}

pub struct WebhookDeliverer {
    webhooks: Webhooks,
    jobs: Jobs,
    queue: Arc<dyn WebhookQueue>,
    transport: Arc<dyn WebhookTransport>,
    schedule: RetrySchedule,
}

impl WebhookDeliverer {
    pub fn new(
        ports: &Ports,
        config: JobsConfig,
        transport: Arc<dyn WebhookTransport>,
        schedule: RetrySchedule,
    ) -> Self {
        Self {
            webhooks: Webhooks::new(ports),
            jobs: Jobs::new(ports, config),
            queue: ports.webhook_queue.clone(),
            transport,
            schedule,
        }
    }

    /// One attempt at the event in `message`. `Err` when a backend failed before the outcome
    /// was recorded: the message comes back when its lease ends, and is tried again.
    pub async fn deliver(&self, message: &Delivery) -> Result<Handled, AppError> {
        let event: JobEvent = match serde_json::from_str(&message.body) {
            Ok(event) => event,
            Err(err) => {
                error!(error = %err, "unreadable webhook message; dropping it");
                return Ok(Handled::Finished);
            }
        };
        let Some(webhook) = event.target().cloned() else { return Ok(Handled::Finished) };
        let span = tracing::Span::current();
        span.record("job_id", event.job.id.as_str());
        let attempt = message.receive_count.max(1);
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
        let result = self.transport.deliver(&request).await;
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
                self.queue.delay(&message.receipt, delay).await?;
                Ok(Handled::Later)
            }
            NextStep::Exhausted => {
                // Back at once, so the redrive moves it to the DLQ on the next receive.
                self.queue.delay(&message.receipt, Duration::ZERO).await?;
                Ok(Handled::Later)
            }
        }
    }
}

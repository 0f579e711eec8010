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
//!
//! Each endpoint (a tenant's receiver origin) has a circuit shared by every deliverer: after
//! [`CircuitPolicy::failures`] failed attempts in a row (no answer, 5xx, 429) it opens for a
//! cool-down that doubles while the failures go on; while it is open, that endpoint's events are
//! hidden until it closes without an attempt, so a receiver that never answers holds no delivery
//! slot and delays no other endpoint's events. One answer closes it.
//!
//! The body is `{type, timestamp, job}`, the job as `GET /v1/jobs/{id}` shows it, with fresh
//! download links.

use chrono::{DateTime, Utc};
use kiln_domain::{JobEvent, Webhook};
use kiln_webhooks::{Attempt, DeliveryRequest, NextStep, Outcome, RetrySchedule, Secret, jitter_seed};
use std::{sync::Arc, time::Duration};
use tracing::{error, info};

use crate::{
    AppError, AttemptOutcome, AttemptRecord, Jobs, JobsConfig, Webhooks,
    ports::{Delivery, EndpointCircuits, EndpointHealth, WebhookQueue, WebhookTransport},
    views::{JobView, WebhookPayload},
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

/// When an endpoint's circuit opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitPolicy {
    /// Failed attempts in a row that open it.
    pub failures: u32,
    /// How long it first stays open; doubled for each further failure, up to `max_open`.
    pub open_for: Duration,
    pub max_open: Duration,
}

impl Default for CircuitPolicy {
    fn default() -> Self {
        Self { failures: 5, open_for: Duration::from_secs(60), max_open: Duration::from_secs(3600) }
    }
}

impl CircuitPolicy {
    /// How long the circuit stays open after `failures` in a row (None: stays closed).
    pub fn open_for(&self, failures: u32) -> Option<Duration> {
        let beyond = failures.checked_sub(self.failures.max(1))?;
        Some(self.open_for.saturating_mul(1 << beyond.min(16)).min(self.max_open))
    }
}

/// The circuit key of a tenant's webhook URL: its tenant and origin (`scheme://host[:port]`).
pub fn endpoint_of(tenant: &kiln_domain::TenantId, url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    format!("{tenant}#{scheme}://{}", host.to_ascii_lowercase())
}

/// Told of every recorded attempt (the function's metrics).
pub type AttemptObserver = Arc<dyn Fn(&AttemptRecord) + Send + Sync>;

pub struct WebhookDeliverer {
    observer: Option<AttemptObserver>,
    webhooks: Webhooks,
    jobs: Jobs,
    queue: Arc<dyn WebhookQueue>,
    circuits: Arc<dyn EndpointCircuits>,
    transport: Arc<dyn WebhookTransport>,
    schedule: RetrySchedule,
    circuit: CircuitPolicy,
}

impl WebhookDeliverer {
    pub fn new(
        ports: &Ports,
        config: JobsConfig,
        transport: Arc<dyn WebhookTransport>,
        schedule: RetrySchedule,
        circuit: CircuitPolicy,
    ) -> Self {
        Self {
            observer: None,
            webhooks: Webhooks::new(ports),
            jobs: Jobs::new(ports, config),
            queue: ports.webhook_queue.clone(),
            circuits: ports.circuits.clone(),
            transport,
            schedule,
            circuit,
        }
    }

    /// Tells `observer` of every attempt once it is recorded.
    pub fn with_observer(mut self, observer: AttemptObserver) -> Self {
        self.observer = Some(observer);
        self
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
        let endpoint = endpoint_of(&event.job.tenant_id, &webhook.url);
        let health = self.circuits.health(&endpoint).await?;
        let held_for = health.open_until.and_then(|until| (until - now).to_std().ok()).filter(|wait| !wait.is_zero());
        let result = match held_for {
            // No request: counted as a failed attempt, on the schedule, and not before the
            // circuit closes.
            Some(wait) => {
                info!(job_id = %event.job.id, event_id = %event.id, %endpoint, ?wait, "endpoint's circuit is open; attempt held back");
                Attempt {
                    outcome: Outcome::Retry { after: Some(wait) },
                    status: None,
                    failure: None,
                    error: Some(format!(
                        "held back: the endpoint failed {} times in a row; its circuit is open for {} s",
                        health.failures,
                        wait.as_secs()
                    )),
                    duration: Duration::ZERO,
                }
            }
            None => self.attempt(&event, &webhook, now).await?,
        };
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
        if let Some(observer) = &self.observer {
            observer(&record);
        }
        if held_for.is_none() {
            self.track_endpoint(&endpoint, health, &result).await?;
        }
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

    /// Updates the endpoint's circuit after an attempt it answered (closed again if it had
    /// failed) or did not (one more failure; open once there are enough).
    async fn track_endpoint(&self, endpoint: &str, health: EndpointHealth, result: &Attempt) -> Result<(), AppError> {
        let answered = result.status.is_some_and(|status| status < 500 && status != 429);
        if answered {
            if health.failures > 0 {
                self.circuits.recovered(endpoint).await?;
            }
            return Ok(());
        }
        let failures = self.circuits.failed(endpoint).await?;
        if let Some(open_for) = self.circuit.open_for(failures) {
            let until = Utc::now() + chrono::Duration::from_std(open_for).unwrap_or_default();
            info!(%endpoint, failures, ?open_for, "endpoint's circuit opens");
            self.circuits.open(endpoint, until).await?;
        }
        Ok(())
    }

    /// One signed POST of the event to `webhook`, with fresh download links.
    async fn attempt(&self, event: &JobEvent, webhook: &Webhook, now: DateTime<Utc>) -> Result<Attempt, AppError> {
        let secrets: Vec<Secret> = self
            .webhooks
            .signing_secrets(&event.job.tenant_id, now)
            .await?
            .iter()
            .filter_map(|text| Secret::parse(text).ok())
            .collect();
        let read = self.jobs.with_links(event.job.clone()).await?;
        let payload = WebhookPayload { kind: event.kind, timestamp: event.timestamp, job: JobView::with_links(&read) };
        let request = DeliveryRequest {
            url: webhook.url.clone(),
            message_id: event.id.clone(),
            body: serde_json::to_vec(&payload).unwrap_or_default().into(),
            secrets,
        };
        Ok(self.transport.deliver(&request).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_is_a_tenants_receiver_origin() {
        let tenant = kiln_domain::TenantId::parse("acme").unwrap();
        assert_eq!(
            endpoint_of(&tenant, "https://Hooks.Example.com:8443/a/b?c=d"),
            "acme#https://hooks.example.com:8443"
        );
        assert_eq!(endpoint_of(&tenant, "https://user:pw@hooks.example.com/x"), "acme#https://hooks.example.com");
        let other = kiln_domain::TenantId::parse("globex").unwrap();
        assert_ne!(endpoint_of(&tenant, "https://h.example/x"), endpoint_of(&other, "https://h.example/x"));
    }

    #[test]
    fn the_circuit_opens_at_the_threshold_and_its_cool_down_doubles_to_a_cap() {
        let policy =
            CircuitPolicy { failures: 3, open_for: Duration::from_secs(10), max_open: Duration::from_secs(35) };
        let open: Vec<Option<u64>> = (1..=6).map(|n| policy.open_for(n).map(|d| d.as_secs())).collect();
        assert_eq!(open, [None, None, Some(10), Some(20), Some(35), Some(35)]);
    }
}

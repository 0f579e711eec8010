//! `deliver-webhooks`: SQS hands it the job events waiting on the webhook queue, up to ten at a
//! time; each is one attempt of [`WebhookDeliverer::deliver`] (sign, POST through
//! `kiln-webhooks`, record, decide). The messages of a batch are sent concurrently and cut off
//! before the invocation's deadline (`kiln_lambda::sqs`), so receivers that never answer delay
//! neither the others nor the batch's answer: the ones delivered are deleted once, the slow
//! ones come back later.

use async_trait::async_trait;
use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent};
use kiln_app::{
    AppError, JobsConfig,
    delivery::{CircuitPolicy, Handled, WebhookDeliverer},
    ports::{Delivery, WebhookTransport},
};
use kiln_aws::AwsPorts;
use kiln_lambda::{
    Error, FunctionConfig, LambdaEvent,
    sqs::{BatchLimits, Processed, handle_event},
};
use kiln_webhooks::{Attempt, DeliveryRequest, RetrySchedule, SenderConfig, WebhookSender};
use std::{sync::Arc, time::Duration};

/// The delivery settings, from the environment.
#[derive(Debug, Clone, clap::Parser)]
pub struct DeliveryConfig {
    #[command(flatten)]
    pub function: FunctionConfig,
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
    /// Seconds to wait for a connection.
    #[arg(long, env = "KILN_WEBHOOK_CONNECT_TIMEOUT_SECS", default_value_t = 5)]
    pub connect_timeout_secs: u64,
    /// Seconds to wait for the whole response.
    #[arg(long, env = "KILN_WEBHOOK_TIMEOUT_SECS", default_value_t = 15)]
    pub timeout_secs: u64,
    /// Events of one batch sent at once (a batch is at most 10 messages).
    #[arg(long, env = "KILN_WEBHOOK_CONCURRENCY", default_value_t = 10)]
    pub concurrency: usize,
    /// Failed attempts in a row (no answer, 5xx, 429) after which an endpoint's circuit opens:
    /// its events are held back without attempts.
    #[arg(long, env = "KILN_WEBHOOK_CIRCUIT_FAILURES", default_value_t = 5)]
    pub circuit_failures: u32,
    /// Seconds an endpoint's circuit first stays open (doubling while failures go on, up to an
    /// hour).
    #[arg(long, env = "KILN_WEBHOOK_CIRCUIT_OPEN_SECS", default_value_t = 60)]
    pub circuit_open_secs: u64,
    /// Local development only: allow http:// and loopback receivers.
    #[arg(long, env = "KILN_WEBHOOK_ALLOW_LOOPBACK", default_value_t = false)]
    pub allow_loopback: bool,
}

impl DeliveryConfig {
    /// The schedule of attempts.
    pub fn schedule(&self) -> anyhow::Result<RetrySchedule> {
        Ok(RetrySchedule::new(
            Duration::from_secs(self.retry_base_secs),
            Duration::from_secs(self.retry_cap_secs),
            self.max_attempts,
            // Equal jitter keeps the whole schedule between about 13 and 26 hours.
            kiln_webhooks::Jitter::Equal,
        )?)
    }

    /// When endpoints' circuits open.
    pub fn circuit(&self) -> CircuitPolicy {
        CircuitPolicy {
            failures: self.circuit_failures,
            open_for: Duration::from_secs(self.circuit_open_secs),
            ..CircuitPolicy::default()
        }
    }

    /// How attempts are made.
    pub fn sender(&self) -> SenderConfig {
        SenderConfig {
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
            response_timeout: Duration::from_secs(self.timeout_secs),
            allow_http: self.allow_loopback,
            allow_loopback: self.allow_loopback,
            ..SenderConfig::default()
        }
    }
}

/// The webhook transport over HTTP: `kiln-webhooks`' guarded, pinned, timed-out sender.
pub struct HttpTransport(pub WebhookSender);

#[async_trait]
impl WebhookTransport for HttpTransport {
    async fn deliver(&self, request: &DeliveryRequest) -> Attempt {
        self.0.deliver(request).await
    }
}

/// The function's state.
pub struct Deliveries {
    pub deliverer: WebhookDeliverer,
    pub limits: BatchLimits,
}

/// Secrets and attempts (the tenants and jobs tables), endpoints' circuits (the requests
/// table), the webhook queue's visibility, links.
pub fn wire(aws: &AwsPorts, config: &DeliveryConfig) -> anyhow::Result<Deliveries> {
    let ports = kiln_app::Ports {
        store: aws.job_store(),
        secrets: aws.secrets(),
        webhook_queue: aws.webhook_queue(),
        circuits: aws.circuits(),
        links: aws.links(),
        ..aws.none()
    };
    let jobs: JobsConfig = config.function.jobs_config();
    let transport = Arc::new(HttpTransport(WebhookSender::new(config.sender())));
    let mut deliverer = WebhookDeliverer::new(&ports, jobs, transport, config.schedule()?, config.circuit());
    if config.function.emit_metrics {
        deliverer = deliverer.with_observer(Arc::new(|record| println!("{}", attempt_metrics(record))));
    }
    Ok(Deliveries { deliverer, limits: BatchLimits { concurrency: config.concurrency, ..BatchLimits::default() } })
}

/// One attempt as a CloudWatch EMF line (namespace `kiln/webhooks`): `Attempts` by `Outcome`
/// (delivered, retrying, abandoned).
pub fn attempt_metrics(record: &kiln_app::AttemptRecord) -> String {
    kiln_lambda::emf::line("kiln/webhooks", &[("Outcome", record.outcome.as_str())], &[("Attempts", 1.0)], record.at)
}

pub async fn setup(config: DeliveryConfig) -> anyhow::Result<Deliveries> {
    wire(&AwsPorts::for_lambda(&config.function.resources), &config)
}

/// One queued event.
pub async fn handle_message(deliveries: &Deliveries, message: &Delivery) -> Result<Processed, AppError> {
    Ok(match deliveries.deliverer.deliver(message).await? {
        Handled::Finished => Processed::Done,
        Handled::Later => Processed::Later,
    })
}

/// One batch, concurrently, within the invocation's deadline.
pub async fn handle(deliveries: Arc<Deliveries>, event: LambdaEvent<SqsEvent>) -> Result<SqsBatchResponse, Error> {
    let deliveries = &deliveries;
    Ok(handle_event(event, deliveries.limits, |message| async move { handle_message(deliveries, &message).await })
        .await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_is_one_emf_line_by_outcome() {
        let record = kiln_app::AttemptRecord {
            event_id: "evt_x_completed_3".into(),
            at: chrono::Utc::now(),
            status: Some(503),
            error: None,
            outcome: kiln_app::AttemptOutcome::Retrying,
        };
        let line: serde_json::Value = serde_json::from_str(&attempt_metrics(&record)).unwrap();
        assert_eq!(line["_aws"]["CloudWatchMetrics"][0]["Namespace"], "kiln/webhooks");
        assert_eq!(line["_aws"]["CloudWatchMetrics"][0]["Dimensions"], serde_json::json!([["Outcome"]]));
        assert_eq!((line["Outcome"].as_str(), line["Attempts"].as_f64()), (Some("retrying"), Some(1.0)));
    }
}

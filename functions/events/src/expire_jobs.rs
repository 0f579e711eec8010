//! `expire-jobs`: run every minute by an EventBridge schedule, it expires queued jobs whose
//! time to live has passed. It is also the backstop for a submit function that died between
//! storing a job and queueing it: such a job ends `expired`, never queued forever.
//!
//! Then it publishes the backlog the runner group scales on (an EMF log line, namespace
//! `kiln`, dimension `QueueName`): `SchedulableBacklog`, the queued jobs of normal and high
//! priority, and `LowPriorityBacklog`. Low-priority jobs never make the group grow on their own.

use aws_lambda_events::eventbridge::EventBridgeEvent;
use chrono::Utc;
use kiln_app::Jobs;
use kiln_aws::AwsPorts;
use kiln_lambda::{Error, FunctionConfig, LambdaEvent};
use serde::Serialize;
use std::sync::Arc;

/// Jobs read per query.
const BATCH: u32 = 100;
/// Queries per invocation; the rest waits for the next minute.
const MAX_BATCHES: usize = 20;

/// What one run did.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: usize,
    /// The backlog after the sweep (None when it could not be read: the metric is skipped).
    pub backlog: Option<kiln_app::jobs::Backlog>,
}

/// The EMF line of `backlog` for the job queue at `queue_url`.
pub fn backlog_metric(queue_url: &str, backlog: &kiln_app::jobs::Backlog, at: chrono::DateTime<Utc>) -> String {
    let queue = queue_url.rsplit('/').next().unwrap_or(queue_url);
    kiln_lambda::emf::line(
        "kiln",
        &[("QueueName", queue)],
        &[("SchedulableBacklog", backlog.schedulable as f64), ("LowPriorityBacklog", backlog.low as f64)],
        at,
    )
}

/// The job use cases on the jobs table (all the sweep touches).
pub fn wire(aws: &AwsPorts, config: &FunctionConfig) -> Jobs {
    let ports = kiln_app::Ports { store: aws.job_store(), ..aws.none() };
    Jobs::new(&ports, config.jobs_config())
}

/// The sweep's state: the job use cases and where the metric line says the queue is.
pub struct Sweep {
    pub jobs: Jobs,
    pub queue_url: String,
}

pub async fn setup(config: FunctionConfig) -> anyhow::Result<Sweep> {
    let jobs = wire(&AwsPorts::for_lambda(&config.resources), &config);
    Ok(Sweep { jobs, queue_url: config.resources.job_queue_url.clone() })
}

/// Handles one scheduled event.
pub async fn handle(
    sweep: Arc<Sweep>,
    event: LambdaEvent<EventBridgeEvent<serde_json::Value>>,
) -> Result<SweepReport, Error> {
    let jobs = &sweep.jobs;
    let now = event.payload.time.unwrap_or_else(Utc::now).max(Utc::now());
    let mut expired = 0;
    for _ in 0..MAX_BATCHES {
        let batch = jobs.expire_overdue(now, BATCH).await?;
        expired += batch;
        if batch < BATCH as usize {
            break;
        }
    }
    let backlog = match jobs.backlog().await {
        Ok(backlog) => {
            // Stdout, not the JSON logs: CloudWatch reads an EMF record from a line of its own.
            println!("{}", backlog_metric(&sweep.queue_url, &backlog, Utc::now()));
            Some(backlog)
        }
        Err(err) => {
            tracing::warn!(error = %err, "reading the backlog failed; no metric this minute");
            None
        }
    };
    tracing::info!(expired, ?backlog, "sweep done");
    Ok(SweepReport { expired, backlog })
}

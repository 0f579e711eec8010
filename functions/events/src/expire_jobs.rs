//! `expire-jobs`: run every minute by an EventBridge schedule, it expires queued jobs whose
//! time to live has passed. It is also the backstop for a submit function that died between
//! storing a job and queueing it: such a job ends `expired`, never queued forever.

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
}

/// The job use cases on the jobs table (all the sweep touches).
pub fn wire(aws: &AwsPorts, config: &FunctionConfig) -> Jobs {
    let ports = kiln_app::Ports { store: aws.job_store(), ..aws.none() };
    Jobs::new(&ports, config.jobs_config())
}

pub async fn setup(config: FunctionConfig) -> anyhow::Result<Jobs> {
    Ok(wire(&AwsPorts::for_lambda(&config.resources), &config))
}

/// Handles one scheduled event.
pub async fn handle(
    jobs: Arc<Jobs>,
    event: LambdaEvent<EventBridgeEvent<serde_json::Value>>,
) -> Result<SweepReport, Error> {
    let now = event.payload.time.unwrap_or_else(Utc::now).max(Utc::now());
    let mut expired = 0;
    for _ in 0..MAX_BATCHES {
        let batch = jobs.expire_overdue(now, BATCH).await?;
        expired += batch;
        if batch < BATCH as usize {
            break;
        }
    }
    tracing::info!(expired, "sweep done");
    Ok(SweepReport { expired })
}

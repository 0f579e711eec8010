//! The `expire-jobs` function: run every minute by an EventBridge schedule, it expires queued
//! jobs whose time to live has passed. It is also the backstop for a submit function that
//! died between storing a job and queueing it: such a job ends `expired`, never queued forever.

use aws_lambda_events::eventbridge::EventBridgeEvent;
use chrono::Utc;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde::Serialize;
use std::sync::Arc;

use crate::{Api, ApiConfig};

/// Jobs read per query.
const BATCH: u32 = 100;
/// Queries per invocation; the rest waits for the next minute.
const MAX_BATCHES: usize = 20;

/// What one run did.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: usize,
}

/// Handles one scheduled event.
pub async fn handle(api: &Api, event: LambdaEvent<EventBridgeEvent<serde_json::Value>>) -> Result<SweepReport, Error> {
    let now = event.payload.time.unwrap_or_else(Utc::now).max(Utc::now());
    let mut expired = 0;
    for _ in 0..MAX_BATCHES {
        let batch = api.jobs().expire_overdue(now, BATCH).await?;
        expired += batch;
        if batch < BATCH as usize {
            break;
        }
    }
    tracing::info!(expired, "sweep done");
    Ok(SweepReport { expired })
}

/// The whole `main` of the sweeper function.
pub async fn run() -> Result<(), Error> {
    crate::lambda::init_tracing();
    let config = <ApiConfig as clap::Parser>::try_parse_from(["expire-jobs"])?;
    let api = Arc::new(Api::from_config(&config).await);
    lambda_runtime::run(service_fn(move |event| {
        let api = api.clone();
        async move { handle(&api, event).await }
    }))
    .await
}

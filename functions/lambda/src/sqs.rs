//! An SQS-triggered function's batch: each message in a span of its own, up to `concurrency`
//! of them at once, within the invocation's deadline, and partial batch failures (the
//! `ReportBatchItemFailures` answer), so one slow or failing message never makes SQS send the
//! finished ones again.
//!
//! The deadline: Lambda stops a function at its timeout, and a batch cut off then is a failed
//! invocation whose every message comes back, finished or not. So no message is started once
//! less than [`BatchLimits::least_time`] is left, every handling is cut off
//! [`BatchLimits::margin`] before the deadline, and both kinds are reported as failures (they
//! come back when their visibility timeout ends) while the batch's answer still gets out.

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use chrono::{TimeZone, Utc};
use futures_util::{StreamExt, stream};
use kiln_app::ports::Delivery;
use std::{
    fmt::Display,
    future::Future,
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::time::Instant;
use tracing::{Instrument, field, info_span, warn};

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// Done with it: the trigger deletes it.
    Done,
    /// Leave it on the queue (it comes back when its visibility timeout ends, which the
    /// handler may have set): reported as a batch item failure.
    Later,
}

/// How a batch is worked through.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Messages handled at once.
    pub concurrency: usize,
    /// Handlings are cut off this long before the invocation's deadline, leaving time to answer.
    pub margin: Duration,
    /// No message is started with less than this left before the cut-off.
    pub least_time: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self { concurrency: 10, margin: Duration::from_millis(500), least_time: Duration::from_secs(1) }
    }
}

/// The message as the use cases see a queue delivery.
pub fn delivery_of(message: &SqsMessage) -> Delivery {
    let attribute = |name: &str| message.attributes.get(name);
    Delivery {
        message_id: message.message_id.clone().unwrap_or_default(),
        body: message.body.clone().unwrap_or_default(),
        receipt: message.receipt_handle.clone().unwrap_or_default(),
        receive_count: attribute("ApproximateReceiveCount").and_then(|n| n.parse().ok()).unwrap_or(1),
        sent_at: attribute("SentTimestamp")
            .and_then(|ms| ms.parse::<i64>().ok())
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single()),
    }
}

/// An SQS-triggered function's invocation: [`handle_batch`] within the deadline its context
/// carries.
pub async fn handle_event<F, Fut, E>(
    event: lambda_runtime::LambdaEvent<SqsEvent>,
    limits: BatchLimits,
    handle: F,
) -> SqsBatchResponse
where
    F: Fn(Delivery) -> Fut,
    Fut: Future<Output = Result<Processed, E>>,
    E: Display,
{
    handle_batch(event.payload, deadline_instant(event.context.deadline), limits, handle).await
}

/// When the invocation must have answered: `deadline_ms` (the context's deadline, Unix
/// milliseconds) as an instant of this process's clock.
pub fn deadline_instant(deadline_ms: u64) -> Instant {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

/// Handles every message of `event` with `handle` (each in a `sqs_message` span with its
/// `message_id` and a `job_id` the handler may record) and answers the messages to leave on
/// the queue: those the handler left for later or failed on, and those the deadline cut off.
pub async fn handle_batch<F, Fut, E>(
    event: SqsEvent,
    deadline: Instant,
    limits: BatchLimits,
    handle: F,
) -> SqsBatchResponse
where
    F: Fn(Delivery) -> Fut,
    Fut: Future<Output = Result<Processed, E>>,
    E: Display,
{
    let cutoff = deadline.checked_sub(limits.margin).unwrap_or(deadline);
    let handle = &handle;
    let outcomes = stream::iter(event.records)
        .map(|message| {
            let id = message.message_id.clone().unwrap_or_default();
            let span = info_span!("sqs_message", message_id = %id, job_id = field::Empty);
            let work = async move {
                let left = cutoff.saturating_duration_since(Instant::now());
                if left < limits.least_time {
                    warn!(left_ms = left.as_millis() as u64, "too close to the deadline to start; left on the queue");
                    return (id, Processed::Later);
                }
                match tokio::time::timeout_at(cutoff, handle(delivery_of(&message))).await {
                    Ok(Ok(processed)) => (id, processed),
                    Ok(Err(err)) => {
                        warn!(error = %err, "message not handled; it will come back");
                        (id, Processed::Later)
                    }
                    Err(_) => {
                        warn!("cut off at the invocation's deadline; it will come back");
                        (id, Processed::Later)
                    }
                }
            };
            work.instrument(span)
        })
        .buffer_unordered(limits.concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut response = SqsBatchResponse::default();
    for (id, processed) in outcomes {
        if processed == Processed::Later {
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = id;
            response.batch_item_failures.push(failure);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(count: usize) -> SqsEvent {
        let mut event = SqsEvent::default();
        for i in 0..count {
            let mut message = SqsMessage::default();
            message.message_id = Some(format!("m{i}"));
            message.body = Some(i.to_string());
            event.records.push(message);
        }
        event
    }

    fn failed(response: &SqsBatchResponse) -> Vec<String> {
        let mut ids: Vec<String> = response.batch_item_failures.iter().map(|f| f.item_identifier.clone()).collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn slow_messages_are_cut_at_the_deadline_and_the_rest_run_beside_them() {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(2_000);
        // Messages 0..3 never finish; 3..10 take a tenth of a second each.
        let response = handle_batch(event(10), deadline, BatchLimits::default(), |delivery| async move {
            let n: u64 = delivery.body.parse().unwrap();
            tokio::time::sleep(if n < 3 { Duration::from_secs(3600) } else { Duration::from_millis(100) }).await;
            Ok::<_, String>(Processed::Done)
        })
        .await;
        assert_eq!(failed(&response), ["m0", "m1", "m2"]);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1_900), "answered {took:?} after the start, past the cut-off");
    }

    #[tokio::test]
    async fn concurrency_is_bounded_and_late_messages_are_not_started() {
        let deadline = Instant::now() + Duration::from_millis(1_100);
        let limits =
            BatchLimits { concurrency: 2, margin: Duration::from_millis(100), least_time: Duration::from_millis(500) };
        // Two at a time, 0.3 s each, cut-off at 1 s: rounds at 0 s and 0.3 s start 4 messages; at
        // 0.6 s less than 0.5 s is left, so the other 6 are not started.
        let response = handle_batch(event(10), deadline, limits, |_| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, String>(Processed::Done)
        })
        .await;
        assert_eq!(response.batch_item_failures.len(), 6);
    }

    #[tokio::test]
    async fn errors_and_later_are_failures_and_done_is_not() {
        let response = handle_batch(
            event(3),
            Instant::now() + Duration::from_secs(60),
            BatchLimits::default(),
            |delivery| async move {
                match delivery.body.as_str() {
                    "0" => Ok(Processed::Done),
                    "1" => Ok(Processed::Later),
                    _ => Err("backend down"),
                }
            },
        )
        .await;
        assert_eq!(failed(&response), ["m1", "m2"]);
    }
}

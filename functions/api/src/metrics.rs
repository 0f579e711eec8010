//! What each answered request adds to CloudWatch: one Embedded Metric Format line on stdout per
//! request (Lambda's log becomes metrics; no SDK, no call), namespace `kiln/api`:
//! - by `Function`: `Requests`, `LatencyMs` (milliseconds), `ClientErrors`, `ServerErrors`,
//!   and for submits `Created`, `CacheHits`, `Deduplicated`, `IdempotentReplays`;
//! - by `Function` and `Code` (errors only): `Errors`, so 4xx are counted by their code;
//! - by `Limit` (429s only): `Throttled`, so refusals are counted by the limit that refused.

use chrono::{DateTime, Utc};
use kiln_app::Disposition;
use std::{sync::Arc, time::Duration};

/// Where the lines go: stdout on Lambda; a test's collector.
pub type MetricsSink = Arc<dyn Fn(String) + Send + Sync>;

/// What one request came to.
#[derive(Debug, Clone, Default)]
pub struct RequestOutcome {
    pub status: u16,
    /// The error's code, for an error answer.
    pub code: Option<&'static str>,
    /// The tenant limit behind a 429.
    pub limit: Option<&'static str>,
    /// A submit's disposition.
    pub disposition: Option<Disposition>,
}

/// The outcome's lines.
pub fn lines(function: &str, outcome: &RequestOutcome, latency: Duration, at: DateTime<Utc>) -> Vec<String> {
    use kiln_lambda::emf::{Metric, line_of};
    let flag = |on: bool| if on { 1.0 } else { 0.0 };
    let mut metrics = vec![
        Metric::count("Requests", 1.0),
        Metric::milliseconds("LatencyMs", latency.as_secs_f64() * 1000.0),
        Metric::count("ClientErrors", flag((400..500).contains(&outcome.status))),
        Metric::count("ServerErrors", flag(outcome.status >= 500)),
    ];
    if let Some(disposition) = outcome.disposition {
        metrics.extend([
            Metric::count("Created", flag(disposition == Disposition::Created)),
            Metric::count("CacheHits", flag(disposition == Disposition::Cached)),
            Metric::count("Deduplicated", flag(disposition == Disposition::Deduplicated)),
            Metric::count("IdempotentReplays", flag(disposition == Disposition::Replayed)),
        ]);
    }
    let mut out = vec![line_of(NAMESPACE, &[("Function", function)], &metrics, at)];
    if let Some(code) = outcome.code {
        out.push(line_of(NAMESPACE, &[("Function", function), ("Code", code)], &[Metric::count("Errors", 1.0)], at));
    }
    if let Some(limit) = outcome.limit {
        out.push(line_of(NAMESPACE, &[("Limit", limit)], &[Metric::count("Throttled", 1.0)], at));
    }
    out
}

pub const NAMESPACE: &str = "kiln/api";

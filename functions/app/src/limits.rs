//! Per-tenant limits on new jobs: how many may be queued or running at once (a quota on the
//! GPUs' backlog) and how many may be submitted in one minute (a rate limit). Only requests that
//! create a job count: an answer from the cache, a deduplicated request and an idempotent replay
//! render nothing and are never refused by these limits.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A tenant's limits. A limit of 0 admits no new jobs (a suspended account keeps its reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantLimits {
    /// Jobs queued or running at once.
    pub max_active_jobs: u32,
    /// New jobs per minute (a fixed one-minute window).
    pub jobs_per_minute: u32,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self { max_active_jobs: 100, jobs_per_minute: 600 }
    }
}

/// The one-minute window `at` falls in: its start (Unix seconds) and the whole seconds until
/// the next one begins (at least 1).
pub fn minute_window(at: DateTime<Utc>) -> (i64, u64) {
    let now = at.timestamp();
    let start = now - now.rem_euclid(60);
    (start, (start + 60 - now).max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_minutes() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert_eq!(minute_window(at("2026-12-01T10:00:00Z")), (at("2026-12-01T10:00:00Z").timestamp(), 60));
        assert_eq!(minute_window(at("2026-12-01T10:00:59.900Z")), (at("2026-12-01T10:00:00Z").timestamp(), 1));
        assert_eq!(minute_window(at("2026-12-01T10:01:15Z")), (at("2026-12-01T10:01:00Z").timestamp(), 45));
    }
}

//! Per-tenant limits on new jobs: how many may be queued or running at once (a quota on the
//! GPUs' backlog), how many may be submitted in one minute (a rate limit) and how many GPU-work
//! units they may cost in one day (a quota on GPU time: see [`kiln_domain::CostModel`]). Only
//! requests that create a job count: an answer from the cache, a deduplicated request and an
//! idempotent replay render nothing and are never refused by these limits.

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// A tenant's limits. A limit of 0 admits no new jobs (a suspended account keeps its reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantLimits {
    /// Jobs queued or running at once.
    pub max_active_jobs: u32,
    /// New jobs per minute (a fixed one-minute window).
    pub jobs_per_minute: u32,
    /// GPU-work units of new jobs per UTC day.
    #[serde(default = "default_units_per_day")]
    pub units_per_day: u64,
}

fn default_units_per_day() -> u64 {
    TenantLimits::default().units_per_day
}

impl Default for TenantLimits {
    /// 2,000,000 units a day: about 140,000 guided 25-step 512² images, some 15 hours of an
    /// H100 (BENCHMARKS.md "Cost units").
    fn default() -> Self {
        Self { max_active_jobs: 100, jobs_per_minute: 600, units_per_day: 2_000_000 }
    }
}

/// A limit a new job can exceed, by its name in the API (`limit` in a 429's error and in
/// `GET /v1/usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitName {
    MaxActiveJobs,
    JobsPerMinute,
    UnitsPerDay,
}

impl LimitName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxActiveJobs => "max_active_jobs",
            Self::JobsPerMinute => "jobs_per_minute",
            Self::UnitsPerDay => "units_per_day",
        }
    }
}

/// A fixed window of time the counters count in: a minute or a UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Its start, Unix seconds.
    pub start: i64,
    /// Its length in seconds.
    pub length: i64,
}

impl Window {
    /// The one-minute window `at` falls in.
    pub fn minute(at: DateTime<Utc>) -> Self {
        Self::of(at, 60)
    }

    /// The UTC day `at` falls in.
    pub fn day(at: DateTime<Utc>) -> Self {
        Self::of(at, 24 * 3600)
    }

    fn of(at: DateTime<Utc>, length: i64) -> Self {
        let now = at.timestamp();
        Self { start: now - now.rem_euclid(length), length }
    }

    /// When the next window begins.
    pub fn resets_at(&self) -> DateTime<Utc> {
        Utc.timestamp_opt(self.start + self.length, 0).single().unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// Whole seconds from `at` until the next window begins (at least 1): a `Retry-After`.
    pub fn secs_left(&self, at: DateTime<Utc>) -> u64 {
        (self.start + self.length - at.timestamp()).max(1) as u64
    }
}

/// A new job's charge against its tenant's counters: one job in the minute and its units in
/// the day, both or neither, and only while both stay within their limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub minute: Window,
    pub day: Window,
    pub units: u64,
    pub jobs_per_minute: u32,
    pub units_per_day: u64,
}

/// What charging did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charged {
    /// Counted.
    Counted,
    /// Nothing counted: the minute already holds `jobs_per_minute` jobs.
    RateLimited,
    /// Nothing counted: the day's units would pass `units_per_day`; `used` were counted.
    OutOfUnits { used: u64 },
}

/// What a tenant's counters hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counted {
    pub units_today: u64,
    pub jobs_this_minute: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_minutes_and_utc_days() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let minute = Window::minute(at("2026-12-01T10:00:59.900Z"));
        assert_eq!(minute.start, at("2026-12-01T10:00:00Z").timestamp());
        assert_eq!(minute.secs_left(at("2026-12-01T10:00:59.900Z")), 1);
        assert_eq!(Window::minute(at("2026-12-01T10:01:15Z")).secs_left(at("2026-12-01T10:01:15Z")), 45);
        assert_eq!(Window::minute(at("2026-12-01T10:00:00Z")).secs_left(at("2026-12-01T10:00:00Z")), 60);
        let day = Window::day(at("2026-12-01T23:59:30Z"));
        assert_eq!(day.start, at("2026-12-01T00:00:00Z").timestamp());
        assert_eq!(day.resets_at(), at("2026-12-02T00:00:00Z"));
        assert_eq!(day.secs_left(at("2026-12-01T23:59:30Z")), 30);
    }
}

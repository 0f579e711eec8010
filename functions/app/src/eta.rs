//! Where a job stands and when it should start and finish: an estimate, labelled as one, from
//! the jobs queued for its model and what the model's runners report of their capacity.
//!
//! - **Queue position**: the queued jobs of its model that will start before it. Jobs of a
//!   higher (aged) priority all do; of the same level, its own tenant's older jobs do, and each
//!   other tenant's, up to that tenant's fair share of the turns until this job's: a tenant of
//!   weight w_u gets about w_u / w_t jobs started for each of this tenant's (weight w_t), as the
//!   runners' fair intake does ([`crate`]'s runner counterpart, `gpu-runner/src/fairness.rs`).
//!   Jobs of a lower level do not count (aging lifts them, so this under-counts a little).
//! - **Start**: now, while the fleet has more free slots than jobs ahead; else, once a slot
//!   frees (with every slot busy, about a job's render time over slots + 1), after the units
//!   ahead at the fleet's throughput (units per second, measured by the runners while all their
//!   slots were taken; a runner never saturated counts one job at a time at its measured render
//!   speed).
//! - **Finish**: the start plus the job's own units at the runners' recent render time per unit;
//!   a running job's, from its progress once it has made some.
//!
//! The error of these estimates against the times jobs really started is measured end to end
//! (`tests/scheduling.rs`, BENCHMARKS.md "Queue estimates").

use chrono::{DateTime, Duration, Utc};
use kiln_domain::{Job, JobStatus, Priority};
use serde::Serialize;
use std::collections::HashMap;

use crate::ports::{QueuedJob, RunnerReport};

/// Where the runners of `model` at `version` report on the fleet board.
pub fn board_key(model: &str, version: &str) -> String {
    format!("{model}@{version}")
}

/// A runner's report counts while it is younger than this (runners report every 10 s).
pub const REPORT_FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Where a queued or running job stands.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Estimate {
    /// Queued: the jobs that will start before it (an estimate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// Queued: when it should start; absent while no runner serves its model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_start_at: Option<DateTime<Utc>>,
    /// When it should finish; absent while no runner serves its model and it has not started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_finish_at: Option<DateTime<Utc>>,
    /// Running: the denoising step it has reached, of `steps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// What the estimate stands on.
    #[serde(rename = "estimate_basis")]
    pub basis: Basis,
}

/// What an estimate stands on, so a client can judge it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Basis {
    /// Runners serving the model that reported within the last minute.
    pub runners: usize,
    /// Their slots, and how many were taken.
    pub slots: u32,
    pub busy: u32,
    /// The fleet's throughput for the model, GPU-work units per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub units_per_sec: Option<f64>,
    /// Whether every runner's throughput was measured with its slots full (false: some count
    /// one job at a time at their render speed, until they have been busy long enough).
    pub throughput_measured: bool,
    /// Queued: how many of the model's queued jobs the position was counted over, and whether
    /// that was all of them (false: the queue is longer than estimates read, and the position is
    /// a lower bound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_read: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_complete: Option<bool>,
}

/// The slots of the runners whose reports are fresh at `now`, whatever is known of their speed.
pub fn live_slots(reports: &[RunnerReport], now: DateTime<Utc>) -> u32 {
    let fresh = Duration::from_std(REPORT_FRESH_FOR).unwrap_or(Duration::MAX);
    reports.iter().filter(|r| now - r.at <= fresh).map(|r| r.slots).sum()
}

/// The live fleet of a model, summed from its runners' fresh reports.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Fleet {
    pub runners: usize,
    pub slots: u32,
    pub busy: u32,
    /// Units per second the fleet finishes with every slot taken.
    pub units_per_sec: f64,
    /// Render time of one unit of one job, in milliseconds (the runners' mean).
    pub ms_per_unit: Option<f64>,
    /// Every runner's throughput was measured (none inferred from its render speed).
    pub measured: bool,
}

impl Fleet {
    /// The runners whose reports are fresh at `now`; None when there are none (or none has
    /// rendered yet, so nothing is known of their speed).
    pub fn of(reports: &[RunnerReport], now: DateTime<Utc>) -> Option<Self> {
        let fresh = Duration::from_std(REPORT_FRESH_FOR).unwrap_or(Duration::MAX);
        let live: Vec<&RunnerReport> = reports.iter().filter(|r| now - r.at <= fresh && r.slots > 0).collect();
        let speeds: Vec<f64> = live.iter().filter_map(|r| r.ms_per_unit).filter(|ms| *ms > 0.0).collect();
        let ms_per_unit = (!speeds.is_empty()).then(|| speeds.iter().sum::<f64>() / speeds.len() as f64);
        let units_per_sec: f64 = live
            .iter()
            .map(|r| match (r.units_per_sec, r.ms_per_unit) {
                (Some(measured), _) if measured > 0.0 => measured,
                (_, Some(ms)) if ms > 0.0 => 1000.0 / ms,
                _ => 0.0,
            })
            .sum();
        (units_per_sec > 0.0).then(|| Self {
            runners: live.len(),
            slots: live.iter().map(|r| r.slots).sum(),
            busy: live.iter().map(|r| r.busy).sum(),
            units_per_sec,
            ms_per_unit,
            measured: live.iter().all(|r| r.units_per_sec.is_some_and(|measured| measured > 0.0)),
        })
    }

    fn basis(fleet: Option<&Self>) -> Basis {
        Basis {
            runners: fleet.map_or(0, |f| f.runners),
            slots: fleet.map_or(0, |f| f.slots),
            busy: fleet.map_or(0, |f| f.busy),
            units_per_sec: fleet.map(|f| (f.units_per_sec * 1000.0).round() / 1000.0),
            throughput_measured: fleet.is_some_and(|f| f.measured),
            queued_read: None,
            queue_complete: None,
        }
    }

    /// How long one job of `units` renders.
    fn render_time(&self, units: u64) -> Duration {
        let ms = self.ms_per_unit.unwrap_or(1000.0 / self.units_per_sec.max(1e-9));
        millis(units.max(1) as f64 * ms)
    }
}

fn millis(ms: f64) -> Duration {
    Duration::milliseconds(ms.clamp(0.0, 1e13) as i64)
}

/// A queued priority lifted one level per [`Priority::AGING`] of its age, as runners rank it.
fn level(priority: Priority, created_at: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    let aged = (now - created_at).num_seconds().max(0) as u64 / Priority::AGING.as_secs().max(1);
    (u64::from(priority.level()) + aged).min(2)
}

/// The estimate of a queued `job`, from `queued` (the oldest queued jobs, every model, at most
/// what the store read; `complete` when that was all of them) and the fleet of its model.
pub fn of_queued(
    job: &Job,
    queued: &[QueuedJob],
    complete: bool,
    fleet: Option<&Fleet>,
    now: DateTime<Utc>,
) -> Estimate {
    let mine = level(job.priority, job.created_at, now);
    let same_model: Vec<&QueuedJob> = queued
        .iter()
        .filter(|q| q.model == job.model && q.model_version == job.model_version && q.id != job.id)
        .collect();
    let (mut ahead, mut ahead_units) = (0u64, 0u64);
    // Same level, by tenant, oldest first.
    let mut peers: HashMap<&str, Vec<&QueuedJob>> = HashMap::new();
    for q in &same_model {
        let theirs = level(q.priority, q.created_at, now);
        if theirs > mine {
            ahead += 1;
            ahead_units += q.cost_units;
        } else if theirs == mine {
            peers.entry(q.tenant_id.as_str()).or_default().push(q);
        }
    }
    let own_weight = u64::from(job.share_weight.unwrap_or(1).max(1));
    let own_before: Vec<&QueuedJob> = peers
        .get(job.tenant_id.as_str())
        .map(|own| own.iter().copied().filter(|q| (q.created_at, &q.id) < (job.created_at, &job.id)).collect())
        .unwrap_or_default();
    // This job is its tenant's turn number `turn`; another tenant gets its weight's share of
    // the turns until then.
    let turn = own_before.len() as u64 + 1;
    ahead += own_before.len() as u64;
    ahead_units += own_before.iter().map(|q| q.cost_units).sum::<u64>();
    for (tenant, mut theirs) in peers {
        if tenant == job.tenant_id.as_str() {
            continue;
        }
        theirs.sort_by_key(|q| q.created_at);
        let weight = u64::from(theirs[0].share_weight.unwrap_or(1).max(1));
        let share = ((turn - 1) * weight).div_ceil(own_weight) + u64::from(theirs[0].created_at < job.created_at);
        let served = theirs.len().min(share as usize);
        ahead += served as u64;
        ahead_units += theirs[..served].iter().map(|q| q.cost_units).sum::<u64>();
    }
    let mut basis = Fleet::basis(fleet);
    basis.queued_read = Some(queued.len());
    basis.queue_complete = Some(complete);
    let (start, finish) = match fleet {
        None => (None, None),
        Some(fleet) => {
            let free = u64::from(fleet.slots.saturating_sub(fleet.busy));
            let wait = if ahead < free {
                Duration::zero()
            } else {
                // The units ahead at the fleet's pace, after the first slot frees: with every
                // slot busy, about a job's render time over (slots + 1) from now.
                let first_free = if free == 0 {
                    fleet.render_time(job.cost_units) / (fleet.slots as i32 + 1)
                } else {
                    Duration::zero()
                };
                first_free + millis(ahead_units as f64 * 1000.0 / fleet.units_per_sec)
            };
            let start = now + wait;
            (Some(start), Some(start + fleet.render_time(job.cost_units)))
        }
    };
    Estimate {
        queue_position: Some(ahead),
        estimated_start_at: start,
        estimated_finish_at: finish,
        step: None,
        steps: None,
        basis,
    }
}

/// The estimate of a running `job`: its step, and its finish from its progress so far (from
/// the fleet's render time per unit before it has made any).
pub fn of_running(job: &Job, fleet: Option<&Fleet>, now: DateTime<Utc>) -> Estimate {
    let steps = job.params.steps.max(1);
    let progress = f64::from(job.progress.clamp(0.0, 1.0));
    let step = ((progress * f64::from(steps)).floor() as u32).min(steps);
    let started = job.started_at.unwrap_or(now);
    let finish = if progress >= 0.05 {
        Some(started + millis((now - started).num_milliseconds().max(0) as f64 / progress))
    } else {
        fleet.map(|fleet| started + fleet.render_time(job.cost_units))
    };
    Estimate {
        queue_position: None,
        estimated_start_at: None,
        estimated_finish_at: finish.map(|at| at.max(now)),
        step: Some(step),
        steps: Some(steps),
        basis: Fleet::basis(fleet),
    }
}

/// The estimate for `job` if it is queued or running.
pub fn of_job(
    job: &Job,
    queued: &[QueuedJob],
    complete: bool,
    fleet: Option<&Fleet>,
    now: DateTime<Utc>,
) -> Option<Estimate> {
    match job.status {
        JobStatus::Queued => Some(of_queued(job, queued, complete, fleet, now)),
        JobStatus::Running => Some(of_running(job, fleet, now)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_domain::{JobParams, OutputFormat, SeedSource, TenantId};

    fn params(steps: u32) -> JobParams {
        JobParams {
            prompt: "x".into(),
            negative_prompt: String::new(),
            width: 512,
            height: 512,
            num_frames: 1,
            fps: None,
            steps,
            guidance: 0.0,
            seed: 1,
            seed_source: SeedSource::Client,
            format: OutputFormat::Png,
            init_image: None,
            strength: None,
        }
    }

    fn job(tenant: &str, n: i64, at: DateTime<Utc>) -> Job {
        let id = kiln_domain::JobId::generate(at + Duration::milliseconds(n));
        let mut job = Job::new(
            id,
            TenantId::parse(tenant).unwrap(),
            "m".into(),
            "1".into(),
            params(10),
            None,
            at + Duration::milliseconds(n),
            Duration::hours(1),
        );
        job.cost_units = 10;
        job
    }

    fn fleet(slots: u32, busy: u32, units_per_sec: f64) -> Fleet {
        Fleet { runners: 1, slots, busy, units_per_sec, ms_per_unit: Some(100.0), measured: true }
    }

    #[test]
    fn a_job_behind_its_own_tenants_backlog_waits_for_it_and_another_tenants_does_not() {
        let now = Utc::now();
        let mut queue: Vec<Job> = (0..20).map(|n| job("a", n, now)).collect();
        let b = job("b", 100, now);
        queue.push(b.clone());
        let queued: Vec<QueuedJob> = queue.iter().map(QueuedJob::of).collect();
        let busy = fleet(4, 4, 20.0);
        // a's 11th job: its 10 older ones, and b's one job (b's share of the turns until then).
        let a10 = of_queued(&queue[10], &queued, true, Some(&busy), now);
        assert_eq!(a10.queue_position, Some(11));
        // Every slot busy: the first frees in about a job's time (10 units at 100 ms) over 5;
        // then 110 units ahead at 20 units/s: 5.5 s; then its own 10 units at 100 ms each.
        assert_eq!(a10.estimated_start_at, Some(now + Duration::milliseconds(200 + 5500)));
        assert_eq!(a10.estimated_finish_at, Some(now + Duration::milliseconds(200 + 6500)));
        // b's job, behind all 20 of a's in the queue, is first in its tenant's line: a gets one
        // turn before it (a's jobs are older), not twenty.
        let first_b = of_queued(&b, &queued, true, Some(&busy), now);
        assert_eq!(first_b.queue_position, Some(1));
        // A weight of 3 gives a three turns for each of b's.
        let heavy: Vec<QueuedJob> = queued
            .iter()
            .map(|q| QueuedJob { share_weight: (q.tenant_id.as_str() == "a").then_some(3), ..q.clone() })
            .collect();
        let b2 = job("b", 101, now);
        let mut with_b2 = heavy.clone();
        with_b2.push(QueuedJob::of(&b2));
        assert_eq!(of_queued(&b2, &with_b2, true, Some(&busy), now).queue_position, Some(1 + 3 + 1));
    }

    #[test]
    fn higher_and_aged_priorities_go_first_and_free_slots_start_at_once() {
        let now = Utc::now();
        let mut old_low = job("a", 0, now - Duration::minutes(2));
        old_low.priority = Priority::Low; // aged two levels: high
        let mut high = job("b", 1, now);
        high.priority = Priority::High;
        let mut low = job("c", 2, now);
        low.priority = Priority::Low;
        let normal = job("d", 3, now);
        let queued: Vec<QueuedJob> = [&old_low, &high, &low, &normal].iter().map(|j| QueuedJob::of(j)).collect();
        let position = |j: &Job| of_queued(j, &queued, true, Some(&fleet(1, 1, 10.0)), now).queue_position;
        assert_eq!(position(&normal), Some(2), "the high one and the aged low one");
        assert_eq!(position(&low), Some(3));
        // Two free slots: the normal job (2 ahead) waits; with three it starts now.
        assert!(of_queued(&normal, &queued, true, Some(&fleet(2, 0, 10.0)), now).estimated_start_at > Some(now));
        assert_eq!(of_queued(&normal, &queued, true, Some(&fleet(3, 0, 10.0)), now).estimated_start_at, Some(now));
        // No runner: a position, no times.
        let alone = of_queued(&normal, &queued, false, None, now);
        assert_eq!(
            (alone.queue_position, alone.estimated_start_at, alone.basis.queue_complete),
            (Some(2), None, Some(false))
        );
    }

    #[test]
    fn a_running_job_shows_its_step_and_finishes_by_its_progress() {
        let now = Utc::now();
        let mut running = job("a", 0, now);
        running.transition(JobStatus::Running, now - Duration::seconds(3)).unwrap();
        running.started_at = Some(now - Duration::seconds(3));
        running.progress = 0.25;
        let estimate = of_running(&running, None, now);
        assert_eq!((estimate.step, estimate.steps), (Some(2), Some(10)));
        assert_eq!(estimate.estimated_finish_at, Some(now + Duration::seconds(9)));
        running.progress = 0.0;
        assert_eq!(of_running(&running, None, now).estimated_finish_at, None);
        // 10 units at 100 ms: a second after it started.
        let by_speed = of_running(&running, Some(&fleet(1, 1, 10.0)), now);
        assert_eq!(by_speed.estimated_finish_at, Some(now), "never in the past");
    }

    #[test]
    fn the_fleet_counts_fresh_reports_and_falls_back_to_one_job_at_a_time() {
        let now = Utc::now();
        let report = |runner: &str, age: i64, units_per_sec: Option<f64>, ms_per_unit: Option<f64>| RunnerReport {
            runner: runner.into(),
            slots: 4,
            busy: 2,
            units_per_sec,
            ms_per_unit,
            at: now - Duration::seconds(age),
        };
        let fleet = Fleet::of(
            &[
                report("a", 5, Some(30.0), Some(100.0)),
                report("b", 5, None, Some(50.0)),
                report("old", 120, Some(99.0), None),
            ],
            now,
        )
        .unwrap();
        assert_eq!((fleet.runners, fleet.slots, fleet.busy), (2, 8, 4));
        assert_eq!(fleet.units_per_sec, 30.0 + 20.0);
        assert_eq!(fleet.ms_per_unit, Some(75.0));
        assert!(!fleet.measured, "b's is inferred");
        assert_eq!(Fleet::of(&[report("new", 1, None, None)], now), None, "nothing known of its speed");
    }
}

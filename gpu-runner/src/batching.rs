//! The batching policy: which waiting jobs a session renders together, and when. Pure
//! functions, so the policy is tested without a model or a clock.
//!
//! A batch fills the way Triton's dynamic batcher fills one: the oldest job waits up to
//! `max_queue_delay` for compatible company, and leaves earlier when the batch is full, when a
//! job that cannot join is waiting behind it (waiting longer would hold that one up too), or
//! when the runner is draining against its shutdown deadline.

use kiln_domain::{Job, JobParams};
use std::time::Duration;

/// Jobs render together only when all of this matches: one graph run takes one tensor shape,
/// every job in it takes the same number of steps, and all or none use guidance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub model: String,
    pub version: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    /// Guidance above 1 takes a second (unconditional) UNet pass; jobs without it would pay for
    /// one they do not use.
    pub guided: bool,
    /// Image-to-image jobs start at a later step ([`crate::render::input::first_step`]).
    pub first_step: u32,
}

impl BatchKey {
    pub fn of(job: &Job) -> Self {
        Self::new(&job.model, &job.model_version, &job.params)
    }

    pub fn new(model: &str, version: &str, params: &JobParams) -> Self {
        Self {
            model: model.to_owned(),
            version: version.to_owned(),
            width: params.width,
            height: params.height,
            steps: params.steps,
            guided: params.guidance > 1.0,
            first_step: crate::render::input::first_step(params),
        }
    }
}

/// Picks the next batch from `waiting` (oldest first): the oldest job, then the next-oldest jobs
/// compatible with it, up to `max_batch`. Returns their indexes, in order. The oldest job always
/// goes first, so no job waits behind a stream of newer compatible ones.
pub fn next_batch(waiting: &[BatchKey], max_batch: usize) -> Vec<usize> {
    let Some(first) = waiting.first() else { return Vec::new() };
    waiting.iter().enumerate().filter(|(_, key)| *key == first).map(|(index, _)| index).take(max_batch.max(1)).collect()
}

/// Why a batch went to the GPU when it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum BatchStop {
    /// As many compatible jobs as a batch holds.
    full,
    /// The oldest job waited `max_queue_delay` (zero: it never waits) for company.
    waited,
    /// A job that cannot join is waiting behind the batch.
    incompatible,
    /// The runner is draining against its shutdown deadline: nothing waits for company.
    deadline,
}

/// How a session fills its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillPolicy {
    /// Most jobs in one render call.
    pub max_batch: usize,
    /// Longest the oldest waiting job waits for compatible jobs to join it.
    pub max_queue_delay: Duration,
}

/// A job waiting in a session: its batch key, and how long it has waited there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub key: BatchKey,
    pub waited: Duration,
}

/// What a session does next with its waiting jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Render these (indexes into the waiting jobs, oldest first), for this reason.
    Render { jobs: Vec<usize>, stop: BatchStop },
    /// Wait at most this long for more jobs, then decide again.
    Wait(Duration),
}

/// Decides, for `waiting` (oldest first, not empty), whether to render now and what, or to
/// wait for the batch to fill. `draining`: the runner is shutting down.
pub fn decide(waiting: &[Waiting], policy: FillPolicy, draining: bool) -> Decision {
    let keys: Vec<BatchKey> = waiting.iter().map(|job| job.key.clone()).collect();
    let jobs = next_batch(&keys, policy.max_batch);
    let render = |stop| Decision::Render { jobs: jobs.clone(), stop };
    let Some(oldest) = waiting.first() else { return render(BatchStop::waited) };
    if jobs.len() >= policy.max_batch.max(1) {
        return render(BatchStop::full);
    }
    if oldest.waited >= policy.max_queue_delay {
        return render(BatchStop::waited);
    }
    if draining {
        return render(BatchStop::deadline);
    }
    if jobs.len() < waiting.len() {
        return render(BatchStop::incompatible);
    }
    Decision::Wait(policy.max_queue_delay - oldest.waited)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(width: u32, steps: u32) -> BatchKey {
        BatchKey { model: "m".into(), version: "1".into(), width, height: 64, steps, guided: true, first_step: 0 }
    }

    #[test]
    fn the_oldest_job_leads_and_only_compatible_jobs_join_it() {
        let waiting = [key(64, 4), key(128, 4), key(64, 4), key(64, 8), key(64, 4), key(64, 4)];
        assert_eq!(next_batch(&waiting, 3), vec![0, 2, 4]);
        assert_eq!(next_batch(&waiting, 1), vec![0]);
        assert_eq!(next_batch(&waiting, 0), vec![0], "a batch holds at least one job");
        assert_eq!(next_batch(&waiting[1..], 4), vec![0]);
        assert!(next_batch(&[], 4).is_empty());
    }

    #[test]
    fn other_models_and_versions_never_share_a_batch() {
        let mut other_version = key(64, 4);
        other_version.version = "2".into();
        let mut other_model = key(64, 4);
        other_model.model = "n".into();
        assert_eq!(next_batch(&[key(64, 4), other_version, other_model, key(64, 4)], 8), vec![0, 3]);
    }

    fn waiting(jobs: &[(BatchKey, u64)]) -> Vec<Waiting> {
        jobs.iter().map(|(key, ms)| Waiting { key: key.clone(), waited: Duration::from_millis(*ms) }).collect()
    }

    const POLICY: FillPolicy = FillPolicy { max_batch: 4, max_queue_delay: Duration::from_millis(50) };

    #[test]
    fn a_batch_waits_to_fill_then_leaves_for_the_first_reason_that_holds() {
        let render = |jobs: Vec<usize>, stop| Decision::Render { jobs, stop };
        // Alone and fresh: wait for company, as long as the oldest has left of its delay.
        assert_eq!(decide(&waiting(&[(key(64, 4), 10)]), POLICY, false), Decision::Wait(Duration::from_millis(40)));
        assert_eq!(
            decide(&waiting(&[(key(64, 4), 30), (key(64, 4), 5)]), POLICY, false),
            Decision::Wait(Duration::from_millis(20))
        );
        // Full: at once, whatever the wait.
        let four = waiting(&[(key(64, 4), 1), (key(64, 4), 1), (key(64, 4), 0), (key(64, 4), 0), (key(64, 4), 0)]);
        assert_eq!(decide(&four, POLICY, false), render(vec![0, 1, 2, 3], BatchStop::full));
        // Waited long enough: what has come.
        assert_eq!(
            decide(&waiting(&[(key(64, 4), 50), (key(64, 4), 20)]), POLICY, false),
            render(vec![0, 1], BatchStop::waited)
        );
        // A job that cannot join waits behind: go now.
        assert_eq!(
            decide(&waiting(&[(key(64, 4), 10), (key(128, 4), 5), (key(64, 4), 1)]), POLICY, false),
            render(vec![0, 2], BatchStop::incompatible)
        );
        // Draining: nothing waits.
        assert_eq!(decide(&waiting(&[(key(64, 4), 0)]), POLICY, true), render(vec![0], BatchStop::deadline));
    }

    #[test]
    fn without_a_queue_delay_or_with_batches_of_one_nothing_waits() {
        let no_delay = FillPolicy { max_queue_delay: Duration::ZERO, ..POLICY };
        assert_eq!(
            decide(&waiting(&[(key(64, 4), 0)]), no_delay, false),
            Decision::Render { jobs: vec![0], stop: BatchStop::waited }
        );
        let ones = FillPolicy { max_batch: 1, ..POLICY };
        assert_eq!(
            decide(&waiting(&[(key(64, 4), 0), (key(64, 4), 0)]), ones, false),
            Decision::Render { jobs: vec![0], stop: BatchStop::full }
        );
    }
}

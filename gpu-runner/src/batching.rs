//! The batching policy: which waiting jobs a session renders together. A pure function, so the
//! policy is tested without a model.

use kiln_domain::{Job, JobParams};

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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(width: u32, steps: u32) -> BatchKey {
        BatchKey { model: "m".into(), version: "1".into(), width, height: 64, steps, guided: true }
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
}

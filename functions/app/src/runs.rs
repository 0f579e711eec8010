//! What a runner does to a job record while it renders it: start it, report progress, notice a
//! cancel request, and end it. Every write is conditional on the revision the runner last saw;
//! when it loses a race it re-reads and decides again, so a runner never overwrites a cancel
//! request, and a runner whose job was taken over by another (after its lease ran out) finds
//! out at its next write and stops.

use chrono::{DateTime, Utc};
use kiln_domain::{IllegalTransition, Job, JobErrorCode, JobId, JobStatus, Output, Timings};
use std::sync::Arc;
use tracing::info;

use crate::{
    AppError,
    ports::JobStore,
    revise::{Change, revise, revise_stored},
};

/// What [`JobRuns::version_unavailable`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unserved {
    /// The queued job failed.
    Failed,
    /// It is running: left to its run.
    Running,
    /// It had ended, or is gone.
    Ended,
}

/// Whether to render a delivered job.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// It is now running under this runner; render it.
    Render(Job),
    /// Its cancel was requested while no runner held it (the last one died): an earlier run
    /// may have uploaded its artifact before dying. Remove that, then end it with
    /// [`JobRuns::cancel`]; until then the job stays running, so a redelivery does this again.
    Cancel(Job),
    /// Nothing to do: acknowledge the message.
    Skip(SkipReason),
}

/// Why a delivered job is not rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// No such job (a stale message).
    Missing,
    /// It already ended (canceled, expired, or finished by an earlier delivery).
    Ended(JobStatus),
    /// Another message for the job holds it: this one is a duplicate (a second send of one
    /// job). The holder's own message restarts the job should its runner die, so this one can
    /// go.
    Duplicate,
}

/// What a write told the runner about its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Written; carry on.
    Done,
    /// The client asked to cancel: stop and call [`JobRuns::cancel`].
    CancelRequested,
    /// The job is no longer this run's (another runner restarted it, or it ended): stop, and
    /// leave the message alone.
    Lost,
}

/// Whether a running job's current run holds a message other than `message_id` (jobs started
/// before runs recorded their message are held by none).
fn held_by_another(job: &Job, message_id: &str) -> bool {
    job.run_message.as_deref().is_some_and(|held| held != message_id)
}

/// The job record operations of a render run.
#[derive(Clone)]
pub struct JobRuns {
    store: Arc<dyn JobStore>,
}

impl JobRuns {
    pub fn new(store: Arc<dyn JobStore>) -> Self {
        Self { store }
    }

    /// Moves the job to running under the queue message `message_id` (queued → running, or
    /// running → running when that same message came back because its runner stopped renewing
    /// its lease), counting an attempt. A running job held by another message is left to it
    /// ([`SkipReason::Duplicate`]): only a lapsed lease is taken over. A job whose cancel was
    /// requested before its runner died is not started: [`Start::Cancel`].
    pub async fn start(&self, id: &JobId, message_id: &str, now: DateTime<Utc>) -> Result<Start, AppError> {
        enum Decision {
            Skip(SkipReason),
            Cancel,
            Render,
        }
        let started = revise_stored(&*self.store, id, |job| {
            if job.status.is_terminal() {
                return Ok(Change::Keep(Decision::Skip(SkipReason::Ended(job.status))));
            }
            if job.status == JobStatus::Running && held_by_another(job, message_id) {
                return Ok(Change::Keep(Decision::Skip(SkipReason::Duplicate)));
            }
            if job.cancel_requested {
                return Ok(Change::Keep(Decision::Cancel));
            }
            job.transition(JobStatus::Running, now)?;
            job.run_message = Some(message_id.to_owned());
            Ok(Change::Write(Decision::Render))
        })
        .await?;
        Ok(match started {
            None => Start::Skip(SkipReason::Missing),
            Some((_, Decision::Skip(skip))) => Start::Skip(skip),
            Some((job, Decision::Cancel)) => Start::Cancel(job),
            Some((job, Decision::Render)) => {
                info!(job_id = %job.id, attempt = job.attempts, "job started");
                Start::Render(job)
            }
        })
    }

    /// Records progress; also how the runner learns of a cancel request.
    pub async fn checkpoint(&self, job: &mut Job, progress: f32) -> Result<Written, AppError> {
        self.write(job, true, |job| {
            job.set_progress(progress);
            Ok(())
        })
        .await
    }

    /// Ends the job as succeeded, unless a cancel request came first.
    pub async fn succeed(
        &self,
        job: &mut Job,
        outputs: Vec<Output>,
        timings: Timings,
        warnings: Vec<String>,
        now: DateTime<Utc>,
    ) -> Result<Written, AppError> {
        self.write(job, true, |job| {
            job.succeed(outputs.clone(), timings.clone(), now)?;
            job.warnings = warnings.clone();
            Ok(())
        })
        .await
    }

    /// Ends the job as canceled (the runner stopped at the client's request).
    pub async fn cancel(&self, job: &mut Job, now: DateTime<Utc>) -> Result<Written, AppError> {
        self.write(job, false, |job| job.transition(JobStatus::Canceled, now)).await
    }

    /// Ends the job as failed.
    pub async fn fail(
        &self,
        job: &mut Job,
        code: JobErrorCode,
        message: &str,
        now: DateTime<Utc>,
    ) -> Result<Written, AppError> {
        self.write(job, false, |job| job.fail(code, message, now)).await
    }

    /// A job whose message `message_id` went to the dead-letter queue: every delivery failed or
    /// its runners died. Ends it as failed whatever its runner last wrote; a job that already
    /// ended stays as it is, and so does a running job another message holds (this one was a
    /// duplicate). Returns whether it changed the job.
    pub async fn dead_lettered(&self, id: &JobId, message_id: &str, now: DateTime<Utc>) -> Result<bool, AppError> {
        let message = "no runner could finish the job: its message reached the dead-letter queue";
        let failed = self.fail_by_message(id, message_id, JobErrorCode::DeadLettered, message, now).await?;
        if failed {
            info!(job_id = %id, "dead-lettered job failed");
        }
        Ok(failed)
    }

    /// A job whose model version no runner served within the wait for one: a queued job fails
    /// (`model_version_unavailable`, with `message`); a running one is left to its run (its
    /// message goes back for a runner of its version), an ended one as it is.
    pub async fn version_unavailable(
        &self,
        id: &JobId,
        message: &str,
        now: DateTime<Utc>,
    ) -> Result<Unserved, AppError> {
        let outcome = revise_stored(&*self.store, id, |job| {
            Ok(match job.status {
                JobStatus::Queued => {
                    job.fail(JobErrorCode::ModelVersionUnavailable, message, now)?;
                    Change::Write(Unserved::Failed)
                }
                JobStatus::Running => Change::Keep(Unserved::Running),
                _ => Change::Keep(Unserved::Ended),
            })
        })
        .await?;
        Ok(outcome.map_or(Unserved::Ended, |(_, outcome)| outcome))
    }

    /// Fails the job unless it has ended or a running job's run holds another message.
    async fn fail_by_message(
        &self,
        id: &JobId,
        message_id: &str,
        code: JobErrorCode,
        message: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, AppError> {
        let failed = revise_stored(&*self.store, id, |job| {
            if job.status.is_terminal() || (job.status == JobStatus::Running && held_by_another(job, message_id)) {
                return Ok(Change::Keep(false));
            }
            job.fail(code, message, now)?;
            Ok(Change::Write(true))
        })
        .await?;
        Ok(failed.is_some_and(|(_, failed)| failed))
    }

    /// Applies `change` to the runner's copy and writes it. When the stored job moved on, re-reads
    /// it: still this run's (running, same attempt) → re-applies the change to the fresh copy,
    /// unless `stop_on_cancel` and a cancel was requested; otherwise the run has lost the job.
    async fn write(
        &self,
        job: &mut Job,
        stop_on_cancel: bool,
        change: impl Fn(&mut Job) -> Result<(), IllegalTransition>,
    ) -> Result<Written, AppError> {
        let attempt = job.attempts;
        let written = revise(&*self.store, job.clone(), |current| {
            if current.status != JobStatus::Running || current.attempts != attempt {
                return Ok(Change::Keep(Written::Lost));
            }
            if stop_on_cancel && current.cancel_requested {
                return Ok(Change::Keep(Written::CancelRequested));
            }
            change(current)?;
            Ok(Change::Write(Written::Done))
        })
        .await?;
        match written {
            Some((_, Written::Lost)) | None => Ok(Written::Lost),
            Some((stored, written)) => {
                *job = stored;
                Ok(written)
            }
        }
    }
}

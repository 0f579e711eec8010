//! What follows from a change of a stored job, wherever the change came from (the API, a
//! runner, the sweeper, the dead-letter handler): the webhook events it raises are queued, and
//! a job started by an inbox upload that has just ended gets its result written to its
//! outboxes. Fed by the jobs table's stream (`job-events`), so no writer needs to know.

use chrono::{DateTime, Utc};
use kiln_domain::Job;

use crate::{AppError, Webhooks, outbox::Outboxes, wiring::Ports};

/// What one change led to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effects {
    /// Webhook events queued.
    pub events: usize,
    /// Outboxes written.
    pub outboxes: usize,
}

pub struct JobChanges {
    webhooks: Webhooks,
    outboxes: Outboxes,
}

impl JobChanges {
    pub fn new(ports: &Ports) -> Self {
        Self { webhooks: Webhooks::new(ports), outboxes: Outboxes::new(ports) }
    }

    /// One change of one job. `after` is None when the job was deleted (its TTL ran out). An
    /// error leaves part of the work done; doing the whole change again is safe (event ids are
    /// stable and outboxes are overwritten).
    pub async fn on_change(
        &self,
        before: Option<&Job>,
        after: Option<&Job>,
        now: DateTime<Utc>,
    ) -> Result<Effects, AppError> {
        let Some(after) = after else { return Ok(Effects::default()) };
        let mut effects = Effects { events: self.webhooks.fan_out(before, after, now).await?, outboxes: 0 };
        let ended_now = after.status.is_terminal() && !before.is_some_and(|b| b.status.is_terminal());
        if ended_now {
            for outbox in &after.outboxes {
                self.outboxes.write_result(after, outbox).await?;
                effects.outboxes += 1;
            }
        }
        Ok(effects)
    }
}

//! Job events for webhooks, derived from two successive versions of a job record (what a
//! DynamoDB stream delivers). Deriving them from the record, rather than raising them where the
//! code changes a job, means every change is seen exactly as stored, whoever made it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{Job, JobStatus, WebhookEvent};

/// One event a job's webhook subscribed to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Stable for the same change of the same job (`evt_<job>_<type>_<revision>`), so a
    /// redelivered stream record yields the same id and receivers can drop the duplicate.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: WebhookEvent,
    pub timestamp: DateTime<Utc>,
    /// The job as stored by the change.
    pub job: Job,
}

/// The events the change from `before` (None: the job was just created) to `after` raises,
/// filtered by what the job's webhook subscribed to. A job without a webhook raises none.
pub fn webhook_events(before: Option<&Job>, after: &Job, now: DateTime<Utc>) -> Vec<JobEvent> {
    let Some(webhook) = &after.webhook else { return Vec::new() };
    let mut kinds = Vec::new();
    let running = after.status == JobStatus::Running;
    // Started again when another runner takes the job over (a new attempt).
    let started = running && !before.is_some_and(|b| b.status == JobStatus::Running && b.attempts == after.attempts);
    if started {
        kinds.push(WebhookEvent::Started);
    } else if running && before.is_some_and(|b| b.progress != after.progress) {
        kinds.push(WebhookEvent::Progress);
    }
    if after.status.is_terminal() && !before.is_some_and(|b| b.status.is_terminal()) {
        kinds.push(WebhookEvent::Completed);
    }
    kinds
        .into_iter()
        .filter(|kind| webhook.events.contains(kind))
        .map(|kind| JobEvent {
            id: format!("evt_{}_{}_{}", after.id, kind.as_str(), after.revision),
            kind,
            timestamp: match kind {
                WebhookEvent::Started => after.started_at.unwrap_or(now),
                WebhookEvent::Completed => after.finished_at.unwrap_or(now),
                WebhookEvent::Progress => now,
            },
            job: after.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JobId, Submission, TenantId, WebhookPolicy, model::tests::demo};

    fn job(events: &str) -> Job {
        let model = demo();
        let body = format!(
            r#"{{"model":"demo","prompt":"x","webhook":{{"url":"https://hooks.example/k","events":{events}}}}}"#
        );
        let params =
            Submission::parse(body.as_bytes()).unwrap().resolve(&model, WebhookPolicy::default(), || 1).unwrap();
        let now = Utc::now();
        Job::new(
            JobId::generate(now),
            TenantId::parse("t").unwrap(),
            model.name,
            model.version,
            params.params,
            params.webhook,
            now,
            chrono::Duration::hours(1),
        )
    }

    fn kinds(before: Option<&Job>, after: &Job) -> Vec<WebhookEvent> {
        webhook_events(before, after, Utc::now()).into_iter().map(|e| e.kind).collect()
    }

    #[test]
    fn a_jobs_life_raises_started_progress_and_completed_once_each() {
        use WebhookEvent::*;
        let queued = job(r#"["started","progress","completed"]"#);
        assert!(kinds(None, &queued).is_empty(), "creating a job raises nothing");
        let mut running = queued.clone();
        running.transition(JobStatus::Running, Utc::now()).unwrap();
        assert_eq!(kinds(Some(&queued), &running), [Started]);
        let mut halfway = running.clone();
        halfway.set_progress(0.5);
        assert_eq!(kinds(Some(&running), &halfway), [Progress]);
        assert!(kinds(Some(&halfway), &halfway).is_empty(), "a write that changes neither raises nothing");
        let mut again = halfway.clone();
        again.transition(JobStatus::Running, Utc::now()).unwrap();
        assert_eq!(kinds(Some(&halfway), &again), [Started], "another runner's attempt starts it again");
        let mut done = again.clone();
        done.succeed(Vec::new(), Default::default(), Utc::now()).unwrap();
        let events = webhook_events(Some(&again), &done, Utc::now());
        assert_eq!(events.iter().map(|e| e.kind).collect::<Vec<_>>(), [Completed]);
        assert_eq!(events[0].id, format!("evt_{}_completed_{}", done.id, done.revision));
        assert_eq!(events[0].timestamp, done.finished_at.unwrap());
        assert!(kinds(Some(&done), &done).is_empty(), "a redelivered change of an ended job raises nothing new");
    }

    #[test]
    fn only_subscribed_events_are_raised_and_jobs_without_webhooks_raise_none() {
        let queued = job(r#"["completed"]"#);
        let mut running = queued.clone();
        running.transition(JobStatus::Running, Utc::now()).unwrap();
        assert!(kinds(Some(&queued), &running).is_empty());
        let mut canceled = queued.clone();
        canceled.transition(JobStatus::Canceled, Utc::now()).unwrap();
        assert_eq!(kinds(Some(&queued), &canceled), [WebhookEvent::Completed], "canceled while queued completes");
        let mut silent = canceled.clone();
        silent.webhook = None;
        assert!(kinds(Some(&queued), &silent).is_empty());
    }
}

//! Job events for webhooks, derived from two successive versions of a job record (what a
//! DynamoDB stream delivers). Deriving them from the record, rather than raising them where the
//! code changes a job, means every change is seen exactly as stored, whoever made it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{Job, JobStatus, Webhook, WebhookEvent};

/// One event a job's webhook subscribed to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Stable for the same change of the same job (`evt_<job>_<type>_<revision>`, and `_<n>`
    /// after it for the job's n-th subscriber), so a redelivered stream record yields the same
    /// id and receivers can drop the duplicate.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: WebhookEvent,
    pub timestamp: DateTime<Utc>,
    /// The job as stored by the change.
    pub job: Job,
    /// Where the event goes (None in events queued before subscribers: the job's webhook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
}

impl JobEvent {
    /// The webhook this event is for.
    pub fn target(&self) -> Option<&Webhook> {
        self.webhook.as_ref().or(self.job.webhook.as_ref())
    }
}

/// The events the change from `before` (None: the job was just created) to `after` raises for
/// each of its webhooks, filtered by what each subscribed to. A subscriber that joined a job
/// that had already ended gets `completed` at once. A job without webhooks raises none.
pub fn webhook_events(before: Option<&Job>, after: &Job, now: DateTime<Utc>) -> Vec<JobEvent> {
    let mut kinds = Vec::new();
    let running = after.status == JobStatus::Running;
    // Started again when another runner takes the job over (a new attempt).
    let started = running && !before.is_some_and(|b| b.status == JobStatus::Running && b.attempts == after.attempts);
    if started {
        kinds.push(WebhookEvent::Started);
    } else if running && before.is_some_and(|b| b.progress != after.progress) {
        kinds.push(WebhookEvent::Progress);
    }
    let ended_now = after.status.is_terminal() && !before.is_some_and(|b| b.status.is_terminal());
    if ended_now {
        kinds.push(WebhookEvent::Completed);
    }
    let mut events = Vec::new();
    for (place, webhook) in after.webhooks() {
        let joined_after_the_end = after.status.is_terminal()
            && !ended_now
            && before.is_some_and(|b| !b.webhooks().any(|(_, old)| old == webhook));
        let kinds_for_it: &[WebhookEvent] = if joined_after_the_end { &[WebhookEvent::Completed] } else { &kinds };
        for &kind in kinds_for_it.iter().filter(|kind| webhook.events.contains(kind)) {
            let suffix = if place == 0 { String::new() } else { format!("_{place}") };
            events.push(JobEvent {
                id: format!("evt_{}_{}_{}{suffix}", after.id, kind.as_str(), after.revision),
                kind,
                timestamp: match kind {
                    WebhookEvent::Started => after.started_at.unwrap_or(now),
                    WebhookEvent::Completed => after.finished_at.unwrap_or(now),
                    WebhookEvent::Progress => now,
                },
                job: after.clone(),
                webhook: Some(webhook.clone()),
            });
        }
    }
    events
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

    #[test]
    fn every_caller_that_joined_the_job_gets_its_own_events() {
        use WebhookEvent::*;
        let queued = job(r#"["started","completed"]"#);
        let second = Webhook { url: "https://other.example/hook".into(), events: vec![Completed] };
        let mut joined = queued.clone();
        assert_eq!(joined.subscribe(&second), crate::Subscription::Added);
        assert_eq!(joined.subscribe(&second), crate::Subscription::AlreadyThere);
        assert!(kinds(Some(&queued), &joined).is_empty(), "joining a queued job raises nothing yet");
        let mut running = joined.clone();
        running.transition(JobStatus::Running, Utc::now()).unwrap();
        assert_eq!(kinds(Some(&joined), &running), [Started], "only the first caller asked for started");
        let mut done = running.clone();
        done.succeed(Vec::new(), Default::default(), Utc::now()).unwrap();
        let events = webhook_events(Some(&running), &done, Utc::now());
        let targets: Vec<_> = events.iter().map(|e| (e.kind, e.target().unwrap().url.as_str(), e.id.clone())).collect();
        assert_eq!(
            targets,
            [
                (Completed, "https://hooks.example/k", format!("evt_{}_completed_{}", done.id, done.revision)),
                (Completed, "https://other.example/hook", format!("evt_{}_completed_{}_1", done.id, done.revision)),
            ]
        );
        // A caller answered from the cache after the end gets completed at once, alone.
        let third = Webhook { url: "https://third.example/hook".into(), events: vec![Completed] };
        let mut cached = done.clone();
        cached.subscribe(&third);
        let events = webhook_events(Some(&done), &cached, Utc::now());
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!((events[0].kind, events[0].target()), (Completed, Some(&third)));
        assert!(events[0].id.ends_with("_2"));
    }
}

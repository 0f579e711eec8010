//! The invariant checker of the chaos run: reads the stack from outside (straight from the
//! backend, never through the fault proxy) and counts every way a job can be lost, duplicated,
//! wrong, or someone else's.

use crate::{
    chaos::{InboxUpload, Outcomes},
    media,
    receiver::Receiver,
};
use kiln_app::ports::JobStore;
use kiln_aws::AwsPorts;
use kiln_domain::{Job, JobId, JobStatus};
use kiln_local::LocalStack;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

/// One invariant and how often it was broken.
#[derive(Debug, Clone)]
pub struct Finding {
    pub name: &'static str,
    pub meaning: &'static str,
    /// Broken this many times.
    pub count: u64,
    /// Whether a count above 0 is allowed (reported, not a failure), and why.
    pub allowed: Option<&'static str>,
    /// A few of the offending ids, for the report.
    pub examples: Vec<String>,
}

/// Every invariant's count, plus figures that describe the run.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    pub invariants: Vec<Finding>,
    /// Final status of the accepted jobs.
    pub statuses: BTreeMap<String, u64>,
    /// Accepted jobs by the number of times a runner started them.
    pub attempts: BTreeMap<u32, u64>,
}

impl Findings {
    /// The invariants broken where 0 is required.
    pub fn violations(&self) -> Vec<&Finding> {
        self.invariants.iter().filter(|f| f.count > 0 && f.allowed.is_none()).collect()
    }

    fn add(&mut self, name: &'static str, meaning: &'static str, examples: Vec<String>) {
        self.invariants.push(Finding { name, meaning, count: examples.len() as u64, allowed: None, examples });
    }

    fn allow(&mut self, name: &'static str, meaning: &'static str, count: u64, why: &'static str) {
        self.invariants.push(Finding { name, meaning, count, allowed: Some(why), examples: Vec::new() });
    }
}

impl fmt::Display for Findings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| invariant | count | required | what it counts |\n|---|---:|---|---|")?;
        for finding in &self.invariants {
            let required = finding.allowed.map_or("0".to_owned(), |why| format!("any ({why})"));
            writeln!(f, "| {} | {} | {required} | {} |", finding.name, finding.count, finding.meaning)?;
        }
        let statuses: Vec<String> = self.statuses.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let attempts: Vec<String> = self.attempts.iter().map(|(a, n)| format!("{a}: {n}")).collect();
        writeln!(f, "\naccepted jobs by final status: {}", statuses.join(", "))?;
        writeln!(f, "accepted jobs by runner starts: {}", attempts.join(", "))?;
        for finding in self.violations() {
            writeln!(
                f,
                "{}: {}",
                finding.name,
                finding.examples.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            )?;
        }
        Ok(())
    }
}

/// Reads the stack straight from the backend.
pub struct Checker<'a> {
    stack: &'a LocalStack,
    receiver: &'a Receiver,
    jobs: Arc<dyn JobStore>,
}

impl<'a> Checker<'a> {
    pub fn new(stack: &'a LocalStack, receiver: &'a Receiver) -> Self {
        let ports = AwsPorts::new(stack.direct.clone(), stack.resources.clone());
        Self { stack, receiver, jobs: ports.job_store() }
    }

    async fn job(&self, id: &str) -> Option<Job> {
        let id = JobId::parse(id).ok()?;
        for _ in 0..3 {
            if let Ok(job) = self.jobs.get(&id).await {
                return job;
            }
        }
        None
    }

    async fn exists(&self, key: &str) -> bool {
        let s3 = self.stack.direct.s3();
        s3.head_object().bucket(&self.stack.resources.artifacts_bucket).key(key).send().await.is_ok()
    }

    async fn inbox_ended(&self, upload: &InboxUpload) -> bool {
        self.exists(&format!("{}result.json", upload.outbox)).await
            || self.exists(&format!("{}error.json", upload.outbox)).await
    }

    /// Polls until every job has ended and every upload has its outcome, or `limit` passes.
    pub async fn wait_until_ended(&self, ids: &[String], uploads: &[InboxUpload], limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut open: BTreeSet<String> = ids.iter().cloned().collect();
        let mut pending: Vec<&InboxUpload> = uploads.iter().collect();
        while Instant::now() < deadline && !(open.is_empty() && pending.is_empty()) {
            let mut ended = Vec::new();
            for id in &open {
                if self.job(id).await.is_some_and(|job| job.status.is_terminal()) {
                    ended.push(id.clone());
                }
            }
            for id in ended {
                open.remove(&id);
            }
            let mut still = Vec::new();
            for upload in pending {
                if !self.inbox_ended(upload).await {
                    still.push(upload);
                }
            }
            pending = still;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Waits until the webhook queue is empty and every ended job that asked for a webhook has
    /// had its `completed` event arrive, or `limit` passes. An empty queue alone is not enough:
    /// the stream relay may still be behind (it handles records one by one, retrying each under
    /// faults), so the queue can be empty before the last events are on it.
    pub async fn wait_for_deliveries(&self, outcomes: &Outcomes, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut awaited = BTreeSet::new();
        for accepted in outcomes.accepted.iter().filter(|a| a.planned.body.get("webhook").is_some()) {
            if self.job(&accepted.id).await.is_some_and(|job| job.status.is_terminal()) {
                awaited.insert(accepted.id.clone());
            }
        }
        while Instant::now() < deadline {
            for received in self.receiver.seen() {
                if received.body["type"] == "completed"
                    && let Some(id) = received.body["job"]["id"].as_str()
                {
                    awaited.remove(id);
                }
            }
            if awaited.is_empty() && crate::messages_on(self.stack, &self.stack.resources.webhook_queue_url).await == 0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Every object under `prefix`: key → last modified.
    async fn objects(&self, prefix: &str) -> anyhow::Result<BTreeMap<String, chrono::DateTime<chrono::Utc>>> {
        let mut objects = BTreeMap::new();
        let mut pages = self
            .stack
            .direct
            .s3()
            .list_objects_v2()
            .bucket(&self.stack.resources.artifacts_bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            for object in page?.contents.unwrap_or_default() {
                let modified = object
                    .last_modified
                    .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos()))
                    .unwrap_or_default();
                objects.insert(object.key.unwrap_or_default(), modified);
            }
        }
        Ok(objects)
    }

    async fn read(&self, key: &str) -> Option<Vec<u8>> {
        let s3 = self.stack.direct.s3();
        let object = s3.get_object().bucket(&self.stack.resources.artifacts_bucket).key(key).send().await.ok()?;
        Some(object.body.collect().await.ok()?.into_bytes().to_vec())
    }

    /// Counts every invariant.
    pub async fn check(&self, outcomes: &Outcomes) -> anyhow::Result<Findings> {
        let mut findings = Findings::default();
        let mut jobs: BTreeMap<String, Option<Job>> = BTreeMap::new();
        for accepted in &outcomes.accepted {
            if !jobs.contains_key(&accepted.id) {
                jobs.insert(accepted.id.clone(), self.job(&accepted.id).await);
            }
        }
        let accepted: BTreeSet<&str> = outcomes.accepted.iter().map(|a| a.id.as_str()).collect();
        for id in &accepted {
            if let Some(Some(job)) = jobs.get(*id) {
                *findings.statuses.entry(job.status.to_string()).or_default() += 1;
                *findings.attempts.entry(job.attempts).or_default() += 1;
            }
        }
        let missing =
            accepted.iter().filter(|id| matches!(jobs.get(**id), Some(None))).map(|s| s.to_string()).collect();
        findings.add("accepted_but_missing", "a job answered 2xx that has no record", missing);
        let not_ended = jobs
            .iter()
            .filter(|(_, job)| job.as_ref().is_some_and(|j| !j.status.is_terminal()))
            .map(|(id, job)| match job {
                Some(j) => format!(
                    "{id} {} attempts {} revision {} progress {} cancel_requested {}",
                    j.status, j.attempts, j.revision, j.progress, j.cancel_requested
                ),
                None => id.clone(),
            })
            .collect();
        findings.add("not_ended_by_deadline", "an accepted job still queued or running at the deadline", not_ended);
        let failed = jobs
            .values()
            .flatten()
            .filter(|j| matches!(j.status, JobStatus::Failed | JobStatus::Expired))
            .map(|j| format!("{} {} {:?}", j.id, j.status, j.error.as_ref().map(|e| e.message.clone())))
            .collect();
        findings.add("failed_or_expired", "an accepted (valid) job that did not succeed and was not canceled", failed);

        // Artifacts: exactly one per output for a succeeded job, decodable, none without a job.
        let objects = self.objects("jobs/").await?;
        let mut by_job: BTreeMap<String, Vec<(&String, &chrono::DateTime<chrono::Utc>)>> = BTreeMap::new();
        for (key, modified) in &objects {
            let id = key.split('/').nth(2).unwrap_or_default().to_owned();
            by_job.entry(id).or_default().push((key, modified));
        }
        for id in by_job.keys() {
            if !jobs.contains_key(id) {
                let job = self.job(id).await;
                jobs.insert(id.clone(), job);
            }
        }
        let (mut wrong, mut undecodable, mut orphans, mut kept_by_canceled) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let cancel_answered: BTreeMap<&str, chrono::DateTime<chrono::Utc>> = outcomes
            .accepted
            .iter()
            .filter_map(|accepted| Some((accepted.id.as_str(), accepted.cancel_answered_at?)))
            .collect();
        let mut kept_by_failed = 0;
        for (id, job) in &jobs {
            let stored = by_job.get(id).cloned().unwrap_or_default();
            let Some(job) = job else {
                orphans.extend(stored.iter().map(|(key, _)| key.to_string()));
                continue;
            };
            if job.status == JobStatus::Canceled {
                let answered = cancel_answered.get(id.as_str());
                kept_by_canceled.extend(stored.iter().map(|(key, modified)| match answered {
                    Some(answered) => format!("{key} written {modified}, cancel answered {answered}"),
                    None => format!("{key} written {modified}"),
                }));
                continue;
            }
            if job.status != JobStatus::Succeeded {
                kept_by_failed += stored.len() as u64;
                continue;
            }
            let expected: BTreeSet<&str> = job.outputs.iter().map(|o| o.key.as_str()).collect();
            let found: BTreeSet<&str> = stored.iter().map(|(key, _)| key.as_str()).collect();
            if expected != found || expected.is_empty() {
                wrong.push(format!("{id}: outputs {expected:?}, stored {found:?}"));
                continue;
            }
            for key in expected {
                let format = key.rsplit('.').next().unwrap_or_default();
                match self.read(key).await {
                    Some(bytes) if media::probe(format, &bytes).is_ok() => {}
                    Some(bytes) => undecodable.push(format!("{key}: {:?}", media::probe(format, &bytes).err())),
                    None => undecodable.push(format!("{key}: unreadable")),
                }
            }
        }
        findings.add(
            "succeeded_without_one_artifact_per_output",
            "a succeeded job whose stored objects are not exactly its outputs",
            wrong,
        );
        findings.add(
            "artifact_does_not_decode",
            "a succeeded job's artifact that is not a valid file of its format",
            undecodable,
        );
        findings.add("artifact_without_job", "an object under jobs/ whose job has no record", orphans);
        findings.add(
            "canceled_job_with_artifact",
            "an object under jobs/ of a canceled job (whenever written: stricter than none after the cancel answer)",
            kept_by_canceled,
        );
        findings.allow(
            "artifacts_of_failed_jobs",
            "objects under jobs/ of a failed job",
            kept_by_failed,
            "a run that uploaded, then could not record its success before its last delivery; never linked",
        );

        self.check_webhooks(outcomes, &jobs, &mut findings).await;
        self.check_inbox(outcomes, &mut findings).await;
        self.check_cache(&jobs, &objects, &mut findings).await?;

        findings.add(
            "idempotency_key_two_jobs",
            "an Idempotency-Key answered with two different jobs",
            (0..outcomes.idempotency_mismatches).map(|n| n.to_string()).collect(),
        );
        findings.add(
            "cross_tenant_answers",
            "another tenant's GET of a job answered with the job",
            (0..outcomes.cross_tenant_answers).map(|n| n.to_string()).collect(),
        );
        let dead_letters = crate::messages_on(self.stack, &self.stack.dead_letter_queue_url()).await as u64;
        findings.allow(
            "job_dlq_left",
            "messages left on the job DLQ",
            dead_letters,
            "the dead-letter function turns each into a failed job",
        );
        Ok(findings)
    }

    async fn check_webhooks(&self, outcomes: &Outcomes, jobs: &BTreeMap<String, Option<Job>>, findings: &mut Findings) {
        let seen = self.receiver.seen();
        // The payload shows the job as its tenant sees it (no tenant id): the run knows whose it is.
        let tenant_of: BTreeMap<&str, usize> =
            outcomes.accepted.iter().map(|a| (a.id.as_str(), a.planned.tenant)).collect();
        let mut bad_signature = Vec::new();
        let mut ids_of_event: BTreeMap<(String, String, String), BTreeSet<String>> = BTreeMap::new();
        let mut deliveries: BTreeMap<String, u64> = BTreeMap::new();
        let mut completed: BTreeSet<String> = BTreeSet::new();
        for received in &seen {
            let job = &received.body["job"];
            let tenant = job["id"].as_str().and_then(|id| tenant_of.get(id));
            if !tenant.is_some_and(|t| received.verified_with.contains(t)) {
                bad_signature.push(received.id.clone());
                continue;
            }
            *deliveries.entry(received.id.clone()).or_default() += 1;
            let job_id = job["id"].as_str().unwrap_or_default().to_owned();
            let kind = received.body["type"].as_str().unwrap_or_default().to_owned();
            // evt_<job>_<kind>_<revision>[_<subscriber>]: one event per subscriber and change.
            let rest = received.id.strip_prefix(&format!("evt_{job_id}_{kind}_")).unwrap_or_default();
            let subscriber = rest.split_once('_').map_or("0", |(_, s)| s);
            let change = if kind == "completed" { String::new() } else { received.id.clone() };
            ids_of_event
                .entry((job_id.clone(), format!("{kind}{change}"), subscriber.to_owned()))
                .or_default()
                .insert(received.id.clone());
            if kind == "completed" {
                completed.insert(job_id);
            }
        }
        let mut never = Vec::new();
        for accepted in &outcomes.accepted {
            let wanted = accepted.planned.body.get("webhook").is_some();
            let ended = jobs.get(&accepted.id).and_then(|j| j.as_ref()).is_some_and(|j| j.status.is_terminal());
            if wanted && ended && !completed.contains(&accepted.id) {
                // What did arrive for it tells a lagging relay (nothing, or no `completed` yet)
                // from a lost event.
                let arrived: Vec<&str> = seen
                    .iter()
                    .filter(|r| r.body["job"]["id"] == accepted.id.as_str())
                    .filter_map(|r| r.body["type"].as_str())
                    .collect();
                let status = jobs.get(&accepted.id).and_then(|j| j.as_ref()).map(|j| j.status);
                never.push(format!("{} ({status:?}; arrived: {arrived:?})", accepted.id));
            }
        }
        never.sort();
        never.dedup();
        let two_ids = ids_of_event
            .iter()
            .filter(|(_, ids)| ids.len() > 1)
            .map(|((job, kind, _), ids)| format!("{job} {kind}: {ids:?}"))
            .collect();
        findings.add(
            "webhook_completed_never_delivered",
            "an ended job with a webhook whose `completed` event never arrived",
            never,
        );
        findings.add(
            "webhook_bad_signature",
            "a delivery that does not verify with its tenant's secret",
            bad_signature,
        );
        findings.add(
            "webhook_event_under_two_ids",
            "one event (job, kind, subscriber) delivered under two webhook-ids",
            two_ids,
        );
        let dead = crate::messages_on(self.stack, &self.stack.webhook_dead_letter_queue_url()).await;
        findings.add(
            "webhook_dead_lettered",
            "events on the webhook DLQ (the receiver always answers 200)",
            (0..dead).map(|n| n.to_string()).collect(),
        );
        let duplicates = deliveries.values().map(|n| n - 1).sum();
        findings.allow(
            "webhook_duplicate_deliveries",
            "deliveries of an event already delivered (same webhook-id)",
            duplicates,
            "at-least-once delivery",
        );
    }

    async fn check_inbox(&self, outcomes: &Outcomes, findings: &mut Findings) {
        let mut without = Vec::new();
        for upload in &outcomes.uploads {
            if !self.inbox_ended(upload).await {
                without.push(upload.key.clone());
            }
        }
        findings.add("inbox_without_outcome", "a stored inbox upload with neither result.json nor error.json", without);
    }

    /// Every cache pointer of the run's tenants leads to a job, and a succeeded job's objects exist.
    async fn check_cache(
        &self,
        jobs: &BTreeMap<String, Option<Job>>,
        objects: &BTreeMap<String, chrono::DateTime<chrono::Utc>>,
        findings: &mut Findings,
    ) -> anyhow::Result<()> {
        let mut pointers = Vec::new();
        let mut pages = self
            .stack
            .direct
            .dynamodb()
            .scan()
            .table_name(&self.stack.resources.requests_table)
            .into_paginator()
            .items()
            .send();
        while let Some(item) = pages.next().await {
            let item = item?;
            let pk = item.get("pk").and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
            let job = item.get("job_id").and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
            if pk.starts_with("cache#chaos-") {
                pointers.push(job);
            }
        }
        let mut broken = Vec::new();
        for id in pointers {
            let job = match jobs.get(&id) {
                Some(job) => job.clone(),
                None => self.job(&id).await,
            };
            match job {
                None => broken.push(format!("{id}: no job")),
                Some(job) if job.status == JobStatus::Succeeded => {
                    for output in &job.outputs {
                        if !objects.contains_key(&output.key) {
                            broken.push(format!("{id}: {} missing", output.key));
                        }
                    }
                }
                Some(_) => {}
            }
        }
        findings.add(
            "cache_pointer_to_missing",
            "a cache pointer to no job, or to a succeeded job whose objects are gone",
            broken,
        );
        Ok(())
    }
}

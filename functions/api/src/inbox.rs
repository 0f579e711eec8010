//! The `inbox-trigger` function: S3 tells it about every object created under `inbox/`. An
//! object `inbox/<tenant>/<name>.json` holding a job spec (the body of `POST /v1/jobs`) starts a
//! job for that tenant; when the job ends, its artifacts and a `result.json` land under
//! `outbox/<tenant>/<name>/` (written by `job-events`). A bad spec gets `error.json` there
//! instead, with the same code, message and field the API would answer, and is not retried.
//!
//! Who may write where: tenants hold no AWS credentials. `POST /v1/uploads` (authenticated by
//! the tenant's API key) answers a presigned PUT for `inbox/<its tenant id>/<name>.json` only,
//! so a tenant can start jobs only under its own prefix; the tenant in the key is trusted
//! because nothing else can write there (the bucket is private).
//!
//! Duplicate events (S3 delivers at least once) start no second job: the submission's
//! idempotency key is derived from the object's key and version (or ETag).

use aws_lambda_events::s3::{S3Event, S3EventRecord};
use bytes::Bytes;
use kiln_app::{
    AppError, Jobs,
    ports::{ArtifactStore, ObjectError, ObjectStore, TenantDirectory},
};
use kiln_domain::TenantId;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use std::sync::Arc;
use tracing::{info, warn};

use crate::{ApiConfig, error::ApiError, job_events::JobEvents};

/// Longest name (before `.json`) of an inbox object.
pub const MAX_NAME_LEN: usize = 128;

/// What happened to one inbox object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboxOutcome {
    /// A job was started (or an identical one joined); its id.
    Started(String),
    /// The spec was refused; `error.json` was written.
    Refused { code: &'static str },
    /// Not an inbox job spec (another key, a folder marker, an unknown tenant): left alone.
    Ignored(String),
}

pub struct Inbox {
    pub jobs: Jobs,
    pub tenants: Arc<dyn TenantDirectory>,
    pub objects: Arc<dyn ObjectStore>,
    pub artifacts: Arc<dyn ArtifactStore>,
    pub events: Arc<JobEvents>,
    pub max_body_bytes: usize,
}

/// `inbox/<tenant>/<name>.json` → (tenant, name).
pub fn parse_key(key: &str) -> Option<(TenantId, String)> {
    let rest = key.strip_prefix("inbox/")?;
    let (tenant, file) = rest.split_once('/')?;
    let name = file.strip_suffix(".json")?;
    valid_name(name).then_some(())?;
    Some((TenantId::parse(tenant).ok()?, name.to_owned()))
}

/// Names are 1 to [`MAX_NAME_LEN`] of `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub fn outbox_prefix(tenant: &TenantId, name: &str) -> String {
    format!("outbox/{tenant}/{name}/")
}

impl Inbox {
    /// Handles one created object. `Err` only for what a retry can fix (AWS unavailable).
    pub async fn on_object(
        &self,
        key: &str,
        version: Option<&str>,
        etag: Option<&str>,
    ) -> Result<InboxOutcome, AppError> {
        let Some((tenant_id, name)) = parse_key(key) else {
            return Ok(InboxOutcome::Ignored(format!("{key} is not inbox/<tenant>/<name>.json")));
        };
        let Some(tenant) = self.tenants.tenant(&tenant_id).await?.filter(|t| !t.disabled) else {
            return Ok(InboxOutcome::Ignored(format!("no active tenant {tenant_id}")));
        };
        let outbox = outbox_prefix(&tenant.id, &name);
        let body = match self.objects.get(key, version, self.max_body_bytes).await {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(InboxOutcome::Ignored(format!("{key} is gone"))),
            Err(ObjectError::TooLarge { limit }) => {
                let error = ApiError::new(
                    http::StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the job spec is larger than {limit} bytes"),
                );
                return self.refuse(&outbox, error).await;
            }
            Err(ObjectError::Port(err)) => return Err(err.into()),
        };
        // Events carry the ETag bare, HEAD and GET answers quote it: compare it bare.
        let object_id = format!("{key}@{}", version.or(etag).map(|tag| tag.trim_matches('"')).unwrap_or("-"));
        match self.jobs.submit_upload(&tenant, &body, &object_id, &outbox).await {
            Ok(submitted) => {
                if submitted.job.status.is_terminal() {
                    // Answered by a job that already ended (a cached result): write it now.
                    self.events.write_outbox(&submitted.job, &outbox).await?;
                }
                info!(tenant_id = %tenant.id, job_id = %submitted.job.id, key, "inbox job started");
                Ok(InboxOutcome::Started(submitted.job.id.to_string()))
            }
            Err(err) => {
                let error = ApiError::from(err);
                if error.status.is_server_error() {
                    return Err(AppError::Contention);
                }
                self.refuse(&outbox, error).await
            }
        }
    }

    async fn refuse(&self, outbox: &str, error: ApiError) -> Result<InboxOutcome, AppError> {
        let body = serde_json::json!({"error": {"code": error.code, "message": error.message, "field": error.field}});
        self.artifacts.put(&format!("{outbox}error.json"), "application/json", Bytes::from(body.to_string())).await?;
        info!(outbox, code = error.code, "inbox job spec refused");
        Ok(InboxOutcome::Refused { code: error.code })
    }

    /// Every record of an S3 event. Returns the outcomes; `Err` makes S3 (or the relay) deliver
    /// the event again.
    pub async fn on_event(&self, event: &S3Event) -> Result<Vec<InboxOutcome>, AppError> {
        let mut outcomes = Vec::new();
        for record in &event.records {
            outcomes.push(self.on_record(record).await?);
        }
        Ok(outcomes)
    }

    async fn on_record(&self, record: &S3EventRecord) -> Result<InboxOutcome, AppError> {
        let object = &record.s3.object;
        let Some(raw) = object.key.as_deref() else { return Ok(InboxOutcome::Ignored("no key".into())) };
        self.on_notified(raw, object.version_id.as_deref(), object.e_tag.as_deref()).await
    }

    /// An S3 notification as raw JSON (`{"Records": [{"s3": {"object": {...}}}]}`), for
    /// deliveries through SQS, whose senders may leave out fields the Lambda event type
    /// requires. A test event (no records) does nothing.
    pub async fn on_notification(&self, notification: &serde_json::Value) -> Result<Vec<InboxOutcome>, AppError> {
        let mut outcomes = Vec::new();
        for record in notification["Records"].as_array().into_iter().flatten() {
            let object = &record["s3"]["object"];
            let Some(raw) = object["key"].as_str() else { continue };
            outcomes.push(self.on_notified(raw, object["versionId"].as_str(), object["eTag"].as_str()).await?);
        }
        Ok(outcomes)
    }

    async fn on_notified(
        &self,
        raw_key: &str,
        version: Option<&str>,
        etag: Option<&str>,
    ) -> Result<InboxOutcome, AppError> {
        // Keys in S3 events are URL-encoded, with `+` for spaces.
        let key = url::form_urlencoded::parse(format!("k={raw_key}").as_bytes())
            .next()
            .map(|(_, value)| value.into_owned())
            .unwrap_or_else(|| raw_key.to_owned());
        let outcome = self.on_object(&key, version, etag).await?;
        if let InboxOutcome::Ignored(why) = &outcome {
            warn!(key, why, "inbox object ignored");
        }
        Ok(outcome)
    }
}

/// The whole `main` of the inbox function.
pub async fn run() -> Result<(), Error> {
    crate::lambda::init_tracing();
    let config = <ApiConfig as clap::Parser>::try_parse_from(["inbox-trigger"])?;
    let clients = kiln_aws::AwsClients::connect(config.resources.endpoint_url.as_deref()).await;
    let inbox = Arc::new(Inbox::on(&clients, &config));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<S3Event>| {
        let inbox = inbox.clone();
        async move { inbox.on_event(&event.payload).await.map(|_| ()).map_err(Error::from) }
    }))
    .await
}

impl Inbox {
    pub fn on(clients: &kiln_aws::AwsClients, config: &ApiConfig) -> Self {
        let r = &config.resources;
        let ports = crate::Ports::aws(clients, config);
        let artifacts = Arc::new(kiln_aws::S3ArtifactStore::new(clients.s3.clone(), &r.artifacts_bucket));
        Self {
            jobs: Jobs::new(ports.store, ports.queue, ports.catalog, ports.links, config.jobs_config()),
            tenants: ports.tenants,
            objects: artifacts.clone(),
            artifacts,
            events: Arc::new(JobEvents::on(clients, config)),
            max_body_bytes: config.max_body_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_inbox_json_objects_of_valid_names_are_job_specs() {
        let (tenant, name) = parse_key("inbox/acme/render-01.json").unwrap();
        assert_eq!((tenant.as_str(), name.as_str()), ("acme", "render-01"));
        for key in [
            "inbox/acme/x.txt",
            "inbox/acme/.json",
            "inbox/acme/a/b.json",
            "outbox/acme/x.json",
            "inbox/x.json",
            "inbox/acme/sp ace.json",
        ] {
            assert!(parse_key(key).is_none(), "{key}");
        }
        assert_eq!(outbox_prefix(&tenant, &name), "outbox/acme/render-01/");
    }
}

//! The S3 inbox: an object `inbox/<tenant>/<name>.json` holding a job spec (the body of `POST
//! /v1/jobs`) starts a job for that tenant; when the job ends, its artifacts and a
//! `result.json` land under `outbox/<tenant>/<name>/`. A spec the API would refuse gets
//! `error.json` there instead, with the same code, message and field, and is not retried.
//!
//! Who may write where: tenants hold no AWS credentials. `POST /v1/uploads` (authenticated by
//! the tenant's API key) answers a presigned PUT for `inbox/<its tenant id>/<name>.json` only,
//! so a tenant can start jobs only under its own prefix; the tenant in the key is trusted
//! because nothing else can write there (the bucket is private).
//!
//! Duplicate notifications (S3 delivers at least once) start no second job: the submission's
//! idempotency key is derived from the object's key and version (or ETag).

use kiln_domain::TenantId;
use std::sync::Arc;
use tracing::{info, warn};

use crate::{
    AppError, Jobs, JobsConfig,
    outbox::{Outboxes, Refusal},
    ports::{ObjectError, ObjectStore, TenantDirectory},
    wiring::Ports,
};

/// Longest name (before `.json`) of an inbox object.
pub const MAX_NAME_LEN: usize = 128;

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

/// Where the result of `inbox/<tenant>/<name>.json` goes.
pub fn outbox_prefix(tenant: &TenantId, name: &str) -> String {
    format!("outbox/{tenant}/{name}/")
}

/// The key an upload link writes for `name`.
pub fn inbox_key(tenant: &TenantId, name: &str) -> String {
    format!("inbox/{tenant}/{name}.json")
}

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

/// The inbox use case.
pub struct Inbox {
    jobs: Jobs,
    tenants: Arc<dyn TenantDirectory>,
    objects: Arc<dyn ObjectStore>,
    outboxes: Outboxes,
    max_body_bytes: usize,
}

impl Inbox {
    /// On `ports`; specs larger than `max_body_bytes` are refused as the API refuses such bodies.
    pub fn new(ports: &Ports, config: JobsConfig, max_body_bytes: usize) -> Self {
        Self {
            jobs: Jobs::new(ports, config),
            tenants: ports.tenants.clone(),
            objects: ports.objects.clone(),
            outboxes: Outboxes::new(ports),
            max_body_bytes,
        }
    }

    /// Handles one created object (its key decoded). `Err` only for what a retry can fix (a
    /// backend unavailable); everything the upload got wrong is answered in `error.json`.
    pub async fn on_object(
        &self,
        key: &str,
        version: Option<&str>,
        etag: Option<&str>,
    ) -> Result<InboxOutcome, AppError> {
        let outcome = self.accept(key, version, etag).await?;
        if let InboxOutcome::Ignored(why) = &outcome {
            warn!(key, why, "inbox object ignored");
        }
        Ok(outcome)
    }

    async fn accept(&self, key: &str, version: Option<&str>, etag: Option<&str>) -> Result<InboxOutcome, AppError> {
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
                let refusal = Refusal {
                    code: "body_too_large",
                    message: format!("the job spec is larger than {limit} bytes"),
                    field: None,
                };
                return self.refuse(&outbox, refusal).await;
            }
            Err(ObjectError::Port(err)) => return Err(err.into()),
        };
        // Events carry the ETag bare, HEAD and GET answers quote it: compare it bare.
        let object_id = format!("{key}@{}", version.or(etag).map(|tag| tag.trim_matches('"')).unwrap_or("-"));
        match self.jobs.submit_upload(&tenant, &body, &object_id, &outbox).await {
            Ok(submitted) => {
                if submitted.job.status.is_terminal() {
                    // Answered by a job that already ended (a cached result): write it now.
                    self.outboxes.write_result(&submitted.job, &outbox).await?;
                }
                info!(tenant_id = %tenant.id, job_id = %submitted.job.id, key, "inbox job started");
                Ok(InboxOutcome::Started(submitted.job.id.to_string()))
            }
            Err(err) if err.is_ours() => Err(err),
            Err(err) => self.refuse(&outbox, Refusal::from(&err)).await,
        }
    }

    async fn refuse(&self, outbox: &str, refusal: Refusal) -> Result<InboxOutcome, AppError> {
        self.outboxes.write_refusal(outbox, &refusal).await?;
        Ok(InboxOutcome::Refused { code: refusal.code })
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
        assert_eq!(inbox_key(&tenant, &name), "inbox/acme/render-01.json");
    }
}

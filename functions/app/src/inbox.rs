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

use chrono::{DateTime, Utc};
use kiln_domain::{InputError, InputErrorKind, JobId, TenantId};
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

/// One upload into the inbox: `inbox/<tenant>/<name>/<upload id>.json`, answered under
/// `outbox/<tenant>/<name>/<upload id>/`. Each upload link has its own id, so two specs
/// uploaded under one name never share an outbox (nor an old `error.json` a later result).
/// Objects of the form `inbox/<tenant>/<name>.json` (links made before upload ids) are still
/// read, and answered under `outbox/<tenant>/<name>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub tenant: TenantId,
    pub name: String,
    /// None for the older form without an id.
    pub id: Option<String>,
}

impl Upload {
    /// A new upload of `name` for `tenant`, with a fresh id (a ULID: ordered by time).
    pub fn new(tenant: &TenantId, name: &str, now: DateTime<Utc>) -> Self {
        Self { tenant: tenant.clone(), name: name.to_owned(), id: Some(JobId::generate(now).to_string()) }
    }

    /// The inbox object's key → its upload; None for anything else under the bucket.
    pub fn parse(key: &str) -> Option<Self> {
        let rest = key.strip_prefix("inbox/")?;
        let (tenant, file) = rest.split_once('/')?;
        let tenant = TenantId::parse(tenant).ok()?;
        let file = file.strip_suffix(".json")?;
        let (name, id) = match file.split_once('/') {
            Some((name, id)) => (name, Some(id)),
            None => (file, None),
        };
        let id_ok = id.is_none_or(|id| JobId::parse(id).is_ok_and(|parsed| parsed.as_str() == id));
        (valid_name(name) && id_ok).then(|| Self { tenant, name: name.to_owned(), id: id.map(str::to_owned) })
    }

    /// The key its link writes.
    pub fn key(&self) -> String {
        match &self.id {
            Some(id) => format!("inbox/{}/{}/{id}.json", self.tenant, self.name),
            None => format!("inbox/{}/{}.json", self.tenant, self.name),
        }
    }

    /// The folder the spec is in: files it names (an init image) are read from here.
    pub fn folder(&self) -> String {
        match &self.id {
            Some(_) => format!("inbox/{}/{}/", self.tenant, self.name),
            None => format!("inbox/{}/", self.tenant),
        }
    }

    /// Where its result goes.
    pub fn outbox(&self) -> String {
        match &self.id {
            Some(id) => format!("outbox/{}/{}/{id}/", self.tenant, self.name),
            None => format!("outbox/{}/{}/", self.tenant, self.name),
        }
    }
}

/// A request for an upload link (`POST /v1/uploads`), signed for the exact size in bytes (so it
/// cannot carry more than is read):
/// - a job spec for the inbox: `{"name": …, "size": …}` (or `"kind": "spec"`);
/// - an image a job can start from: `{"kind": "image", "content_type": "image/png" or
///   "image/jpeg", "size": …}`, stored under a fresh image id that jobs name in `init_image`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadRequest {
    Spec { name: String, size: u64 },
    Image { format: kiln_domain::ImageFormat, size: u64 },
}

impl UploadRequest {
    /// Parses the JSON body; `max_size` is the inbox's limit on a spec.
    pub fn parse(body: &[u8], max_size: u64) -> Result<Self, InputError> {
        let body: serde_json::Value = serde_json::from_slice(body).map_err(|err| {
            InputError::new(InputErrorKind::InvalidJson, None, format!("the body is not valid JSON: {err}"))
        })?;
        let object = body
            .as_object()
            .ok_or_else(|| InputError::new(InputErrorKind::InvalidJson, None, "the body must be a JSON object"))?;
        let kind = match object.get("kind") {
            None => "spec",
            Some(kind) => kind.as_str().filter(|k| matches!(*k, "spec" | "image")).ok_or_else(|| {
                InputError::invalid("kind", "must be \"spec\" (a job spec for the inbox) or \"image\" (an init image)")
            })?,
        };
        let allowed: &[&str] =
            if kind == "image" { &["kind", "content_type", "size"] } else { &["kind", "name", "size"] };
        if let Some(unknown) = object.keys().find(|key| !allowed.contains(&key.as_str())) {
            return Err(InputError::new(
                InputErrorKind::UnknownField,
                Some(unknown.chars().take(64).collect::<String>()),
                format!("unknown field; an upload of kind {kind} takes {}", allowed.join(", ")),
            ));
        }
        let size_of = |limit: u64, what: &str| -> Result<u64, InputError> {
            let size = object.get("size").ok_or_else(|| InputError::missing("size"))?;
            size.as_u64()
                .filter(|size| (1..=limit).contains(size))
                .ok_or_else(|| InputError::invalid("size", format!("must be the {what}'s size in bytes, 1 to {limit}")))
        };
        if kind == "image" {
            let content_type = object.get("content_type").ok_or_else(|| InputError::missing("content_type"))?;
            let format = content_type
                .as_str()
                .and_then(kiln_domain::ImageFormat::from_content_type)
                .ok_or_else(|| InputError::invalid("content_type", "must be image/png or image/jpeg"))?;
            return Ok(Self::Image { format, size: size_of(kiln_domain::image::MAX_IMAGE_BYTES, "image")? });
        }
        let name = object.get("name").ok_or_else(|| InputError::missing("name"))?;
        let name = name.as_str().ok_or_else(|| InputError::invalid("name", "must be a string"))?;
        if !valid_name(name) {
            return Err(InputError::invalid(
                "name",
                format!("must be 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ - and not start with a dot"),
            ));
        }
        Ok(Self::Spec { name: name.to_owned(), size: size_of(max_size, "spec")? })
    }
}

/// The body of `POST /v1/uploads` as the API document describes it ([`UploadRequest::parse`]
/// reads it, with an error naming the field for each mistake).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum UploadBody {
    Spec(SpecUpload),
    Image(ImageUpload),
}

/// A job spec for the inbox: `inbox/<tenant>/<name>/<upload id>.json`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpecUpload {
    /// `spec`, the default.
    #[schema(value_type = String, required = false, pattern = "^spec$")]
    pub kind: Option<String>,
    /// Names the result's folder: `outbox/<tenant>/<name>/<upload id>/`.
    #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$", example = "lighthouse")]
    pub name: String,
    /// The spec's exact size in bytes (the link is signed for it), at most the API's body limit.
    #[schema(minimum = 1)]
    pub size: u64,
}

/// An image a job can start from (`init_image`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageUpload {
    #[schema(value_type = String, pattern = "^image$")]
    pub kind: String,
    #[schema(value_type = String, pattern = "^image/(png|jpeg)$", example = "image/png")]
    pub content_type: String,
    /// The image's exact size in bytes, at most 20 MiB.
    #[schema(minimum = 1, maximum = 20971520)]
    pub size: u64,
}

/// The answer to `POST /v1/uploads`: a presigned PUT for the exact size asked.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct UploadLink {
    #[serde(flatten)]
    pub target: UploadTarget,
    pub size: u64,
    /// Always `PUT`.
    pub method: &'static str,
    pub url: String,
    pub expires_at: DateTime<Utc>,
    /// Send exactly these with the PUT (the link is signed for them).
    pub headers: UploadHeaders,
    /// The object the PUT writes.
    pub key: String,
}

/// What an upload is for.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum UploadTarget {
    /// A job spec: the job starts when it lands.
    Spec {
        upload_id: String,
        name: String,
        /// Where the job's result lands.
        outbox: String,
    },
    /// An init image.
    Image {
        /// The id a job names in `init_image`.
        image: String,
    },
}

/// The headers an upload's PUT must carry (the link is signed for them).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct UploadHeaders {
    #[serde(rename = "content-type")]
    pub content_type: String,
    #[serde(rename = "content-length")]
    pub content_length: String,
}

/// Names are 1 to [`MAX_NAME_LEN`] of `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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
        let Some(upload) = Upload::parse(key) else {
            return Ok(InboxOutcome::Ignored(format!("{key} is not inbox/<tenant>/<name>/<upload id>.json")));
        };
        let Some(tenant) = self.tenants.tenant(&upload.tenant).await?.filter(|t| !t.disabled) else {
            return Ok(InboxOutcome::Ignored(format!("no active tenant {}", upload.tenant)));
        };
        let outbox = upload.outbox();
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
        match self.jobs.submit_upload(&tenant, &body, &object_id, &outbox, &upload.folder()).await {
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
        let tenant = TenantId::parse("acme").unwrap();
        let upload = Upload::new(&tenant, "render-01", Utc::now());
        let id = upload.id.clone().unwrap();
        assert_eq!(upload.key(), format!("inbox/acme/render-01/{id}.json"));
        assert_eq!(upload.outbox(), format!("outbox/acme/render-01/{id}/"));
        assert_eq!(Upload::parse(&upload.key()), Some(upload.clone()));
        let older = Upload::parse("inbox/acme/render-01.json").unwrap();
        assert_eq!(
            (older.name.as_str(), older.id.clone(), older.outbox()),
            ("render-01", None, "outbox/acme/render-01/".into())
        );
        for key in [
            "inbox/acme/x.txt",
            "inbox/acme/.json",
            "inbox/acme/a/b.json",
            "inbox/acme/a/b/c.json",
            &format!("inbox/acme/a/{}.json", id.to_lowercase()),
            "outbox/acme/x.json",
            "inbox/x.json",
            "inbox/acme/sp ace.json",
        ] {
            assert!(Upload::parse(key).is_none(), "{key}");
        }
    }

    #[test]
    fn two_uploads_under_one_name_have_two_outboxes() {
        let tenant = TenantId::parse("acme").unwrap();
        let (a, b) = (Upload::new(&tenant, "same", Utc::now()), Upload::new(&tenant, "same", Utc::now()));
        assert_ne!(a.key(), b.key());
        assert_ne!(a.outbox(), b.outbox());
    }
}

//! The API's OpenAPI 3.1 document, built from the request, response and error types the routes
//! use (`utoipa`). `GET /v1/openapi.json` serves it; `openapi.json` at the workspace root is the
//! committed copy, and a test fails when the two differ (`KILN_BLESS=1` rewrites it).
//!
//! The operations below are markers for the document: the routes themselves are in
//! [`crate::routes`]. Errors every authenticated route can answer (401, 500, 503) are added to
//! each operation by [`CommonErrors`], so an operation lists only its own.

use kiln_app::{
    eta::Estimate,
    inbox::{UploadBody, UploadLink},
    views::{JobPage, JobView, ModelList, SecretView, UsageView, WebhookPayload},
};
use kiln_domain::{JobRequest, JobStatus};
use utoipa::{
    Modify, OpenApi,
    openapi::{
        self, HttpMethod, PathItem, RefOr, Required,
        path::{OperationBuilder, ParameterBuilder, ParameterIn},
        request_body::RequestBodyBuilder,
        response::{ResponseBuilder, ResponsesBuilder},
        schema::SchemaType,
        security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
    },
};

use crate::error::ErrorBody;

/// The document, as served and committed.
pub fn document() -> openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as `GET /v1/openapi.json` answers it and `openapi.json` holds it (built once).
pub fn document_json() -> &'static str {
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JSON.get_or_init(|| document().to_pretty_json().unwrap_or_default() + "\n")
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kiln",
        description = "Text-to-image and text-to-video jobs: submit, follow, cancel, and fetch the outputs by \
            presigned URL. Every route under /v1 but this document and the playground page takes \
            `Authorization: Bearer <API key>`; \
            a job belongs to the key's tenant and is invisible to others. Errors are \
            `{\"error\": {\"code\", \"message\", \"field\"}}` with a stable `code`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        submit_job,
        list_jobs,
        get_job,
        cancel_job,
        list_models,
        get_usage,
        webhook_secret,
        rotate_webhook_secret,
        create_upload,
        openapi_document,
        playground
    ),
    components(schemas(ErrorBody, WebhookPayload, Estimate)),
    modifiers(&CommonErrors, &JobEvents, &EstimateInJob),
    security(("api_key" = [])),
    tags(
        (name = "jobs", description = "Rendering jobs"),
        (name = "models", description = "What can be rendered, with each model's limits and defaults"),
        (name = "account", description = "The tenant's limits and webhook secret"),
        (name = "uploads", description = "Presigned uploads: init images and S3 inbox job specs"),
    )
)]
struct ApiDoc;

/// Submit a job.
///
/// Answers at once: the job is queued (202), or an identical job of this tenant is already
/// queued or running and is returned (202, `deduplicated`), or an identical job already succeeded
/// and its result is returned without rendering (200, `cached`; needs a `seed`). With an
/// `Idempotency-Key`, a retry of the same body returns the first answer (200,
/// `Idempotent-Replayed: true`); the same key with another body is refused (422).
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs", operation_id = "submit_job",
    request_body = JobRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, max_length = 255, pattern = "^[\\x21-\\x7e]+$",
            description = "Makes retries safe: the same key and body return the first job"),
    ),
    responses(
        (status = 200, description = "An earlier result (`cached`) or a replayed submission", body = JobView,
            headers(("Idempotent-Replayed" = String, description = "`true` when this answers a retry of an earlier submission")),
            links(
                ("GetJob" = (operation_id = "get_job", parameters(("id" = "$response.body#/id")))),
                ("CancelJob" = (operation_id = "cancel_job", parameters(("id" = "$response.body#/id")))),
            )),
        (status = 202, description = "Queued (or `deduplicated`: joined an identical queued or running job)", body = JobView,
            links(
                ("GetJob" = (operation_id = "get_job", parameters(("id" = "$response.body#/id")))),
                ("CancelJob" = (operation_id = "cancel_job", parameters(("id" = "$response.body#/id")))),
            )),
        (status = 400, description = "The body is not a JSON object of known fields with the right types", body = ErrorBody),
        (status = 413, description = "The body is larger than the API accepts", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "A value the model does not allow, an unknown model, an invalid `Idempotency-Key`, or one reused with another body", body = ErrorBody),
        (status = 429, description = "A tenant limit (`error.limit`): active jobs, jobs per minute or units per day", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the limit frees (not for active jobs)"))),
    )
)]
#[allow(dead_code)]
fn submit_job() {}

/// List the tenant's jobs, newest first.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs", operation_id = "list_jobs",
    params(
        ("status" = Option<JobStatus>, Query, description = "Only jobs in this status"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Page size (default 20)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of jobs", body = JobPage),
        (status = 400, description = "An unknown query parameter", body = ErrorBody),
        (status = 422, description = "A query parameter's value is invalid", body = ErrorBody),
    )
)]
#[allow(dead_code)]
fn list_jobs() {}

/// A job: status, progress, queue position and estimates while it waits or runs, and on success
/// its outputs with presigned download URLs.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs", operation_id = "get_job",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
    )
)]
#[allow(dead_code)]
fn get_job() {}

/// Cancel a job. A queued job is canceled at once (200); a running one stops at its next step
/// (202, `cancel_requested`). Canceling a canceled job is answered 200 again.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs", operation_id = "cancel_job",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "Canceled", body = JobView,
            links(("GetJob" = (operation_id = "get_job", parameters(("id" = "$response.body#/id")))))),
        (status = 202, description = "Running: it stops at its next step", body = JobView,
            links(("GetJob" = (operation_id = "get_job", parameters(("id" = "$response.body#/id")))))),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
        (status = 409, description = "The job has already ended otherwise", body = ErrorBody),
    )
)]
#[allow(dead_code)]
fn cancel_job() {}

/// The served models, each with its limits, defaults and pinnable versions.
#[utoipa::path(
    get, path = "/v1/models", tag = "models", operation_id = "list_models",
    responses((status = 200, description = "The models", body = ModelList))
)]
#[allow(dead_code)]
fn list_models() {}

/// The tenant's limits and how much of each is used.
#[utoipa::path(
    get, path = "/v1/usage", tag = "account", operation_id = "get_usage",
    responses((status = 200, description = "Limits and use", body = UsageView))
)]
#[allow(dead_code)]
fn get_usage() {}

/// The secret that signs the tenant's webhooks (made on first use).
#[utoipa::path(
    get, path = "/v1/webhooks/secret", tag = "account", operation_id = "get_webhook_secret",
    responses((status = 200, description = "The current secret", body = SecretView))
)]
#[allow(dead_code)]
fn webhook_secret() {}

/// A new signing secret; the previous one keeps signing too (a second signature) for 24 hours.
#[utoipa::path(
    post, path = "/v1/webhooks/secret/rotate", tag = "account", operation_id = "rotate_webhook_secret",
    responses((status = 200, description = "The new secret", body = SecretView))
)]
#[allow(dead_code)]
fn rotate_webhook_secret() {}

/// A presigned PUT, valid 15 minutes, for an init image (`kind: image`; jobs name it in
/// `init_image`) or for a job spec in the tenant's S3 inbox (`kind: spec`, the default; the job
/// starts when it lands and its result goes to `outbox`).
#[utoipa::path(
    post, path = "/v1/uploads", tag = "uploads", operation_id = "create_upload",
    request_body = UploadBody,
    responses(
        (status = 201, description = "The link and the headers its PUT must carry", body = UploadLink),
        (status = 400, description = "The body is not a JSON object, or has an unknown or missing field", body = ErrorBody),
        (status = 422, description = "A field's value is invalid (`size` out of range, a bad `name` or `content_type`)", body = ErrorBody),
    )
)]
#[allow(dead_code)]
fn create_upload() {}

/// This document (no key needed).
#[utoipa::path(
    get, path = "/v1/openapi.json", tag = "models", operation_id = "get_openapi", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json",
        body = Object))
)]
#[allow(dead_code)]
fn openapi_document() {}

/// The web playground: a page to paste a key into, render with any model and see the result.
#[utoipa::path(
    get, path = "/v1/playground", tag = "models", operation_id = "get_playground", security(()),
    responses((status = 200, description = "The page", content_type = "text/html", body = String))
)]
#[allow(dead_code)]
fn playground() {}

/// The bearer key, and the errors every authenticated operation can answer.
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The tenant's API key: `Authorization: Bearer <key>`"))
                    .build(),
            ),
        );
        let error = |description: &str, header: Option<(&str, &str)>| {
            let mut response = ResponseBuilder::new().description(description).content(
                "application/json",
                openapi::content::Content::new(Some(RefOr::Ref(openapi::Ref::from_schema_name("ErrorBody")))),
            );
            if let Some((name, about)) = header {
                let mut value = openapi::header::Header::new(string_schema());
                value.description = Some(about.to_owned());
                response = response.header(name, value);
            }
            response.build()
        };
        let unauthorized = error("No valid API key", Some(("WWW-Authenticate", "`Bearer`")));
        let internal = error("A fault of ours (logged; the message says nothing of internals)", None);
        let unavailable = error(
            "A backend is unavailable or busy: nothing was changed, retrying is safe",
            Some(("Retry-After", "Seconds to wait before retrying")),
        );
        for item in doc.paths.paths.values_mut() {
            for operation in operations(item) {
                // A public operation says so itself: `security(())`, no key needed.
                let public = operation
                    .security
                    .as_ref()
                    .is_some_and(|requirements| requirements.contains(&SecurityRequirement::default()));
                let responses = &mut operation.responses.responses;
                if !public {
                    responses.insert("401".into(), RefOr::T(unauthorized.clone()));
                    responses.insert("503".into(), RefOr::T(unavailable.clone()));
                }
                responses.insert("500".into(), RefOr::T(internal.clone()));
            }
        }
    }
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut openapi::path::Operation> {
    [&mut item.get, &mut item.post].into_iter().filter_map(Option::as_mut)
}

/// `{"type": "string"}`, for headers.
fn string_schema() -> openapi::schema::ObjectBuilder {
    openapi::schema::ObjectBuilder::new().schema_type(SchemaType::from(openapi::schema::Type::String))
}

/// A queued or running job's estimate fields are flattened into the job (`queue_position`,
/// `step`, …): the document lists them among the job's properties, none required.
struct EstimateInJob;

impl Modify for EstimateInJob {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let Some(components) = doc.components.as_mut() else { return };
        let estimate = match components.schemas.get("Estimate") {
            Some(RefOr::T(openapi::Schema::Object(estimate))) => estimate.properties.clone(),
            _ => return,
        };
        if let Some(RefOr::T(openapi::Schema::Object(job))) = components.schemas.get_mut("JobView") {
            job.properties.extend(estimate);
        }
    }
}

/// The webhook requests kiln sends (`webhooks` in OpenAPI 3.1).
struct JobEvents;

impl Modify for JobEvents {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let header = |name: &str, about: &str| {
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Header)
                .required(Required::True)
                .description(Some(about))
                .schema(Some(string_schema()))
                .build()
        };
        let operation = OperationBuilder::new()
            .operation_id(Some("job_event"))
            .summary(Some("A job event, POSTed to the job's webhook URL"))
            .description(Some(
                "Signed per Standard Webhooks with the tenant's secret (`GET /v1/webhooks/secret`). Sent at \
                 least once: `webhook-id` is the same for a redelivery. Answer 2xx within 10 s; other \
                 answers are retried with backoff, and a dead endpoint's circuit opens for a while.",
            ))
            .parameter(header("webhook-id", "The event's id, the same on every delivery of it"))
            .parameter(header("webhook-timestamp", "Unix seconds when this delivery was signed"))
            .parameter(header(
                "webhook-signature",
                "`v1,<base64 HMAC-SHA256>` per active secret, space-separated, of `<id>.<timestamp>.<body>`",
            ))
            .request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content(
                        "application/json",
                        openapi::content::Content::new(Some(RefOr::Ref(openapi::Ref::from_schema_name(
                            "WebhookPayload",
                        )))),
                    )
                    .build(),
            ))
            .responses(ResponsesBuilder::new().response("200", ResponseBuilder::new().description("Received")).build())
            .build();
        let webhooks = doc.webhooks.get_or_insert_with(Default::default);
        webhooks.paths.insert("jobEvent".into(), PathItem::new(HttpMethod::Post, operation));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_every_route() {
        let doc: serde_json::Value = serde_json::from_str(document_json()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths: Vec<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
        for route in [
            "/v1/jobs",
            "/v1/jobs/{id}",
            "/v1/jobs/{id}/cancel",
            "/v1/models",
            "/v1/usage",
            "/v1/webhooks/secret",
            "/v1/webhooks/secret/rotate",
            "/v1/uploads",
            "/v1/openapi.json",
            "/v1/playground",
        ] {
            assert!(paths.contains(&route), "{route} is not in the document: {paths:?}");
        }
        assert!(doc["webhooks"]["jobEvent"]["post"].is_object());
        assert!(doc["paths"]["/v1/jobs/{id}"]["get"]["responses"]["401"]["headers"]["WWW-Authenticate"].is_object());
        assert!(doc["paths"]["/v1/openapi.json"]["get"]["responses"].get("401").is_none());
    }

    /// utoipa's attributes take literals only: each limit the document states is held here to
    /// the constant the code checks, so the two cannot drift apart.
    #[test]
    fn the_documents_limits_are_the_codes() {
        use kiln_app::{inbox, jobs};
        use kiln_domain::{image, params};
        let doc: serde_json::Value = serde_json::from_str(document_json()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let property = |schema: &str, name: &str| schemas[schema]["properties"][name].clone();
        let request = |name: &str| property("JobRequest", name);
        assert_eq!(request("prompt")["maxLength"], params::MAX_PROMPT_CHARS);
        assert_eq!(request("negative_prompt")["maxLength"], params::MAX_PROMPT_CHARS);
        assert_eq!(request("seed")["maximum"], u32::MAX);
        assert_eq!(property("JobParams", "seed")["maximum"], u32::MAX);
        assert_eq!(request("strength")["minimum"], params::MIN_FRACTION);
        assert_eq!(property("WebhookRequest", "url")["maxLength"], params::MAX_WEBHOOK_URL_BYTES);
        assert_eq!(property("ImageUpload", "size")["maximum"], image::MAX_IMAGE_BYTES);
        let name = property("SpecUpload", "name")["pattern"].as_str().unwrap().to_owned();
        assert!(name.ends_with(&format!("{{0,{}}}$", inbox::MAX_NAME_LEN - 1)), "{name}");
        let parameter = |path: &str, method: &str, name: &str| {
            doc["paths"][path][method]["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("{method} {path} has no parameter {name}"))
                .clone()
        };
        assert_eq!(parameter("/v1/jobs", "get", "limit")["schema"]["maximum"], jobs::MAX_PAGE);
        assert_eq!(
            parameter("/v1/jobs", "post", "Idempotency-Key")["schema"]["maxLength"],
            jobs::MAX_IDEMPOTENCY_KEY_LEN
        );
    }

    #[test]
    fn the_committed_document_is_the_served_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json");
        let served = document_json();
        if std::env::var_os("KILN_BLESS").is_some() {
            std::fs::write(&path, served).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == served,
            "openapi.json differs from the document the API serves (a type or route changed): review the change \
             and run `KILN_BLESS=1 cargo test -p kiln-api --lib openapi` to rewrite it"
        );
    }
}

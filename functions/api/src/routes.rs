//! Routing and the route handlers: thin translations between HTTP and the use cases.

use http::{Method, Response, StatusCode, header};
use kiln_app::{
    Authenticator, Disposition, Jobs, Ports, Tenant, Webhooks, inbox,
    inbox::{UploadHeaders, UploadLink, UploadTarget},
    ports::ArtifactLinks,
    views::{JobPage, JobView, ModelList, ModelView, SecretView, UsageView},
};
use kiln_domain::{InputError, InputErrorKind, JobId, JobStatus};
use kiln_lambda::FunctionConfig;
use lambda_http::{Body, Request, RequestExt};
use serde::Serialize;
use std::sync::Arc;
use tracing::{Instrument, field, info_span};

use crate::error::ApiError;

/// A route of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/jobs`
    SubmitJob,
    /// `GET /v1/jobs`
    ListJobs,
    /// `GET /v1/jobs/{id}`
    GetJob(String),
    /// `POST /v1/jobs/{id}/cancel`
    CancelJob(String),
    /// `GET /v1/models`
    ListModels,
    /// `GET /v1/usage`: the tenant's limits and what counts against them.
    GetUsage,
    /// `GET /v1/webhooks/secret`: the tenant's signing secret (made on first use).
    WebhookSecret,
    /// `POST /v1/webhooks/secret/rotate`
    RotateWebhookSecret,
    /// `POST /v1/uploads`: a presigned PUT into the tenant's S3 inbox.
    CreateUpload,
    /// `GET /v1/openapi.json`: the API's description (no key needed).
    OpenApi,
    /// `GET /v1/playground` (and `GET /` on the local server): the web playground, a static
    /// page that asks for the key itself.
    Playground,
}

/// The web playground (`functions/api/playground/index.html`).
pub const PLAYGROUND_HTML: &str = include_str!("../playground/index.html");

/// What the public pages may do: the playground's own inline script and style, calls to this
/// API only, outputs from their presigned URLs; never inside another site's frame (a page that
/// holds a key must not be clickjacked into spending a tenant's units).
const PLAYGROUND_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
    connect-src 'self'; img-src http: https: data:; media-src http: https:; frame-ancestors 'none'; \
    base-uri 'none'; form-action 'none'";

impl Route {
    /// Matches a method and path; the error is the answer when nothing matches.
    pub fn resolve(method: &Method, path: &str) -> Result<Self, ApiError> {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let (route, allowed) = match segments.as_slice() {
            ["v1", "jobs"] if method == Method::POST => (Some(Self::SubmitJob), ""),
            ["v1", "jobs"] if method == Method::GET => (Some(Self::ListJobs), ""),
            ["v1", "jobs"] => (None, "GET, POST"),
            ["v1", "jobs", id] if method == Method::GET => (Some(Self::GetJob((*id).to_owned())), ""),
            ["v1", "jobs", _] => (None, "GET"),
            ["v1", "jobs", id, "cancel"] if method == Method::POST => (Some(Self::CancelJob((*id).to_owned())), ""),
            ["v1", "jobs", _, "cancel"] => (None, "POST"),
            ["v1", "models"] if method == Method::GET => (Some(Self::ListModels), ""),
            ["v1", "models"] => (None, "GET"),
            ["v1", "usage"] if method == Method::GET => (Some(Self::GetUsage), ""),
            ["v1", "usage"] => (None, "GET"),
            ["v1", "webhooks", "secret"] if method == Method::GET => (Some(Self::WebhookSecret), ""),
            ["v1", "webhooks", "secret"] => (None, "GET"),
            ["v1", "webhooks", "secret", "rotate"] if method == Method::POST => (Some(Self::RotateWebhookSecret), ""),
            ["v1", "webhooks", "secret", "rotate"] => (None, "POST"),
            ["v1", "uploads"] if method == Method::POST => (Some(Self::CreateUpload), ""),
            ["v1", "uploads"] => (None, "POST"),
            ["v1", "openapi.json"] if method == Method::GET => (Some(Self::OpenApi), ""),
            ["v1", "openapi.json"] => (None, "GET"),
            [] | ["v1", "playground"] if method == Method::GET => (Some(Self::Playground), ""),
            [] | ["v1", "playground"] => (None, "GET"),
            _ => (None, ""),
        };
        match (route, allowed) {
            (Some(route), _) => Ok(route),
            (None, "") => {
                Err(ApiError::new(StatusCode::NOT_FOUND, "route_not_found", format!("no route {method} {path}")))
            }
            (None, allowed) => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed here; allowed: {allowed}"),
            )
            .with_header(header::ALLOW, allowed)),
        }
    }
}

/// A Lambda function of the API and the routes it serves (API Gateway sends it only those).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Function {
    SubmitJob,
    GetJob,
    ListJobs,
    CancelJob,
    ListModels,
    GetUsage,
    /// Showing and rotating the webhook signing secret.
    WebhookSecret,
    CreateUpload,
    /// Every route: the local server.
    All,
}

impl Function {
    /// The function's name in `terraform/functions.json` (and its binary's).
    pub fn name(self) -> &'static str {
        match self {
            Self::SubmitJob => "submit-job",
            Self::GetJob => "get-job",
            Self::ListJobs => "list-jobs",
            Self::CancelJob => "cancel-job",
            Self::ListModels => "list-models",
            Self::GetUsage => "get-usage",
            Self::WebhookSecret => "webhook-secret",
            Self::CreateUpload => "create-upload",
            Self::All => "kiln-local",
        }
    }

    fn serves(self, route: &Route) -> bool {
        matches!(
            (self, route),
            (Self::All, _)
                | (Self::SubmitJob, Route::SubmitJob)
                | (Self::GetJob, Route::GetJob(_))
                | (Self::ListJobs, Route::ListJobs)
                | (Self::CancelJob, Route::CancelJob(_))
                | (Self::ListModels, Route::ListModels | Route::OpenApi | Route::Playground)
                | (Self::GetUsage, Route::GetUsage)
                | (Self::WebhookSecret, Route::WebhookSecret | Route::RotateWebhookSecret)
                | (Self::CreateUpload, Route::CreateUpload)
        )
    }
}

/// The API's state: the use cases and the settings of the HTTP layer.
pub struct Api {
    jobs: Jobs,
    auth: Authenticator,
    webhooks: Webhooks,
    links: Arc<dyn ArtifactLinks>,
    max_body_bytes: usize,
    /// Where each request's metric lines go (`KILN_EMIT_METRICS`: stdout, for CloudWatch).
    metrics: Option<crate::metrics::MetricsSink>,
}

/// How long an upload link from `POST /v1/uploads` stays valid.
const UPLOAD_LINK_TTL: std::time::Duration = std::time::Duration::from_secs(15 * 60);

impl Api {
    /// The API on `ports` (a function wires those its routes use: see [`crate::wiring`]).
    pub fn new(ports: &Ports, config: &FunctionConfig) -> Self {
        Self {
            jobs: Jobs::new(ports, config.jobs_config()),
            webhooks: Webhooks::new(ports),
            links: ports.links.clone(),
            auth: Authenticator::new(ports.tenants.clone()),
            max_body_bytes: config.max_body_bytes,
            metrics: config
                .emit_metrics
                .then(|| -> crate::metrics::MetricsSink { Arc::new(|line| println!("{line}")) }),
        }
    }

    /// Sends each request's metric lines to `sink` instead (tests).
    pub fn with_metrics(mut self, sink: crate::metrics::MetricsSink) -> Self {
        self.metrics = Some(sink);
        self
    }

    /// The job use cases, for callers that are not HTTP (the demo, tests).
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// Answers one request. Never fails: every error becomes an error response.
    pub async fn handle(&self, function: Function, request: Request) -> Response<Body> {
        let path = match request.raw_http_path() {
            raw if !raw.is_empty() => raw.to_owned(),
            _ => request.uri().path().to_owned(),
        };
        let span = info_span!(
            "request",
            function = ?function,
            method = %request.method(),
            path = %path,
            tenant_id = field::Empty,
            job_id = field::Empty,
            status = field::Empty,
        );
        async {
            let started = std::time::Instant::now();
            let (response, code, limit) = match self.route(function, &path, &request).await {
                Ok(response) => (response, None, None),
                Err(err) => {
                    let (code, limit) = (err.code, err.limit);
                    (err.into_response(), Some(code), limit)
                }
            };
            tracing::Span::current().record("status", response.status().as_u16());
            tracing::info!("answered");
            if let Some(sink) = &self.metrics {
                let outcome = crate::metrics::RequestOutcome {
                    status: response.status().as_u16(),
                    code,
                    limit,
                    disposition: response.extensions().get::<Disposition>().copied(),
                };
                for line in crate::metrics::lines(function.name(), &outcome, started.elapsed(), chrono::Utc::now()) {
                    sink(line);
                }
            }
            response
        }
        .instrument(span)
        .await
    }

    async fn route(&self, function: Function, path: &str, request: &Request) -> Result<Response<Body>, ApiError> {
        let route = Route::resolve(request.method(), path)?;
        if !function.serves(&route) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "route_not_found",
                format!("this function does not serve {path}"),
            ));
        }
        let public = match route {
            Route::OpenApi => Some(("application/json", crate::openapi::document_json().to_owned())),
            Route::Playground => Some(("text/html; charset=utf-8", PLAYGROUND_HTML.to_owned())),
            _ => None,
        };
        if let Some((content_type, body)) = public {
            let mut page = respond(StatusCode::OK, content_type, body)?;
            let headers = page.headers_mut();
            headers.insert(header::CACHE_CONTROL, http::HeaderValue::from_static("public, max-age=300"));
            headers.insert(header::CONTENT_SECURITY_POLICY, http::HeaderValue::from_static(PLAYGROUND_POLICY));
            headers.insert(header::X_CONTENT_TYPE_OPTIONS, http::HeaderValue::from_static("nosniff"));
            return Ok(page);
        }
        let authorization = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let tenant = self.auth.authenticate(authorization).await?;
        tracing::Span::current().record("tenant_id", tenant.id.as_str());
        match route {
            Route::SubmitJob => self.submit(&tenant, request).await,
            Route::ListJobs => self.list(&tenant, request).await,
            Route::GetJob(id) => {
                tracing::Span::current().record("job_id", id.as_str());
                let read = self.jobs.get(&tenant, &id).await?;
                json(StatusCode::OK, &JobView::with_links(&read))
            }
            Route::CancelJob(id) => {
                tracing::Span::current().record("job_id", id.as_str());
                let job = self.jobs.cancel(&tenant, &id).await?;
                let status = if job.status == JobStatus::Canceled { StatusCode::OK } else { StatusCode::ACCEPTED };
                json(status, &JobView::new(&job, &[]))
            }
            Route::ListModels => {
                let models = self.jobs.models().await?;
                json(StatusCode::OK, &ModelList { models: ModelView::list(&models) })
            }
            Route::GetUsage => json(StatusCode::OK, &UsageView::new(&self.jobs.usage(&tenant).await?)),
            Route::WebhookSecret => {
                let secret = self.webhooks.current_secret(&tenant.id, chrono::Utc::now()).await?;
                json(StatusCode::OK, &SecretView { secret: &secret.value, created_at: secret.created_at, note: None })
            }
            Route::RotateWebhookSecret => {
                let secret = self.webhooks.rotate_secret(&tenant.id, chrono::Utc::now()).await?;
                let note = "the previous secret keeps signing (as a second signature) for 24 hours";
                json(
                    StatusCode::OK,
                    &SecretView { secret: &secret.value, created_at: secret.created_at, note: Some(note) },
                )
            }
            Route::CreateUpload => self.create_upload(&tenant, request).await,
            Route::OpenApi | Route::Playground => unreachable!("answered before authentication"),
        }
    }

    async fn submit(&self, tenant: &Tenant, request: &Request) -> Result<Response<Body>, ApiError> {
        let body: &[u8] = request.body().as_ref();
        if body.len() > self.max_body_bytes {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is {} bytes; at most {} are accepted", body.len(), self.max_body_bytes),
            ));
        }
        let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let is_json = content_type.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "send the body as application/json (got `{}`)",
                    content_type.chars().take(64).collect::<String>()
                ),
            )
            .with_field("Content-Type"));
        }
        let idempotency_key = match request.headers().get("idempotency-key") {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| {
                ApiError::from(kiln_app::AppError::from(InputError::invalid(
                    "Idempotency-Key",
                    "must be printable ASCII",
                )))
            })?),
        };
        let submitted = self.jobs.submit(tenant, body, idempotency_key).await?;
        tracing::Span::current().record("job_id", submitted.job.id.as_str());
        let read = self.jobs.with_links(submitted.job).await?;
        let mut view = JobView::with_links(&read);
        view.cached = Some(submitted.disposition == Disposition::Cached);
        view.deduplicated = Some(submitted.disposition == Disposition::Deduplicated);
        let status = match submitted.disposition {
            Disposition::Created | Disposition::Deduplicated => StatusCode::ACCEPTED,
            Disposition::Cached | Disposition::Replayed => StatusCode::OK,
        };
        let mut response = json(status, &view)?;
        response.extensions_mut().insert(submitted.disposition);
        if submitted.disposition == Disposition::Replayed {
            response.headers_mut().insert("idempotent-replayed", http::HeaderValue::from_static("true"));
        }
        Ok(response)
    }

    /// A presigned PUT for one upload, `inbox/<tenant>/<name>/<upload id>.json`, signed for the
    /// spec's exact size: the only way a tenant writes to the bucket, so it can start jobs only
    /// under its own prefix, with specs no larger than the inbox reads.
    async fn create_upload(&self, tenant: &Tenant, request: &Request) -> Result<Response<Body>, ApiError> {
        let asked = inbox::UploadRequest::parse(request.body().as_ref(), self.max_body_bytes as u64)
            .map_err(kiln_app::AppError::from)?;
        let now = chrono::Utc::now();
        let (target, key, content_type, size) = match asked {
            inbox::UploadRequest::Spec { name, size } => {
                let upload = inbox::Upload::new(&tenant.id, &name, now);
                let (key, outbox) = (upload.key(), upload.outbox());
                let target = UploadTarget::Spec { upload_id: upload.id.unwrap_or_default(), name: upload.name, outbox };
                (target, key, "application/json", size)
            }
            inbox::UploadRequest::Image { format, size } => {
                let image = kiln_domain::image::new_image_id(format, now);
                let key = kiln_domain::image::uploaded_key(&tenant.id, &image);
                (UploadTarget::Image { image }, key, format.content_type(), size)
            }
        };
        let link = self.presign_put(&key, content_type, size).await?;
        let headers = UploadHeaders { content_type: content_type.to_owned(), content_length: size.to_string() };
        let answer =
            UploadLink { target, size, method: "PUT", url: link.url, expires_at: link.expires_at, headers, key };
        json(StatusCode::CREATED, &answer)
    }

    async fn presign_put(
        &self,
        key: &str,
        content_type: &str,
        size: u64,
    ) -> Result<kiln_app::ports::PresignedUrl, ApiError> {
        Ok(self.links.presign_put(key, content_type, size, UPLOAD_LINK_TTL).await.map_err(kiln_app::AppError::from)?)
    }

    async fn list(&self, tenant: &Tenant, request: &Request) -> Result<Response<Body>, ApiError> {
        let mut status = None;
        let mut limit = 20;
        let mut after = None;
        let query = request.uri().query().unwrap_or("");
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let invalid =
                |message: String| ApiError::from(kiln_app::AppError::from(InputError::invalid(&name, message)));
            match name.as_ref() {
                "status" => status = Some(value.parse::<JobStatus>().map_err(|e| invalid(e.to_string()))?),
                "limit" => {
                    limit = value.parse::<u32>().map_err(|_| invalid(format!("`{value}` is not a whole number")))?
                }
                "cursor" => {
                    after = Some(JobId::parse(&value).map_err(|_| invalid("not a cursor from a previous page".into()))?)
                }
                other => {
                    return Err(kiln_app::AppError::from(InputError::new(
                        InputErrorKind::UnknownField,
                        Some(other.chars().take(64).collect()),
                        "unknown query parameter; use status, limit or cursor",
                    ))
                    .into());
                }
            }
        }
        let page = self.jobs.list(tenant, status, limit, after.as_ref()).await?;
        let jobs: Vec<JobView> = page.jobs.iter().map(|job| JobView::new(job, &[])).collect();
        json(StatusCode::OK, &JobPage { jobs, next_cursor: page.next.map(|id| id.as_str().to_owned()) })
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Result<Response<Body>, ApiError> {
    let body = serde_json::to_string(value).map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("encoding the response: {e}"))
    })?;
    respond(status, "application/json", body)
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Result<Response<Body>, ApiError> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::Text(body))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_resolve_by_method_and_path() {
        let ok = |m: Method, p: &str| Route::resolve(&m, p).unwrap();
        assert_eq!(ok(Method::POST, "/v1/jobs"), Route::SubmitJob);
        assert_eq!(ok(Method::GET, "/v1/jobs/"), Route::ListJobs);
        assert_eq!(ok(Method::GET, "/v1/jobs/abc"), Route::GetJob("abc".into()));
        assert_eq!(ok(Method::POST, "/v1/jobs/abc/cancel"), Route::CancelJob("abc".into()));
        assert_eq!(ok(Method::GET, "/v1/models"), Route::ListModels);
        assert_eq!(ok(Method::GET, "/v1/usage"), Route::GetUsage);
        assert_eq!(ok(Method::GET, "/v1/openapi.json"), Route::OpenApi);
        assert_eq!(ok(Method::GET, "/"), Route::Playground);
        assert_eq!(ok(Method::GET, "/v1/playground"), Route::Playground);
        assert_eq!(Route::resolve(&Method::POST, "/").unwrap_err().status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(Route::resolve(&Method::DELETE, "/v1/jobs/abc").unwrap_err().status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(Route::resolve(&Method::GET, "/v2/jobs").unwrap_err().status, StatusCode::NOT_FOUND);
        assert_eq!(Route::resolve(&Method::GET, "/v1/jobs/a/b/c").unwrap_err().status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn each_function_serves_only_its_routes() {
        assert!(Function::GetJob.serves(&Route::GetJob("x".into())));
        assert!(!Function::GetJob.serves(&Route::SubmitJob));
        assert!(Function::All.serves(&Route::CancelJob("x".into())));
    }
}

//! The one place where errors become HTTP statuses and `{"error": {code, message, field}}` bodies.

use http::{Response, StatusCode, header};
use kiln_app::{AppError, ports::PortError};
use kiln_domain::InputErrorKind;
use lambda_http::Body;
use serde::Serialize;
use tracing::{error, warn};

/// A failure answered to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// On a 429: the tenant limit that refused (`max_active_jobs`, `jobs_per_minute`,
    /// `units_per_day`) and when it frees up (none for active jobs: when one ends).
    pub limit: Option<&'static str>,
    pub resets_at: Option<chrono::DateTime<chrono::Utc>>,
    pub headers: Vec<(header::HeaderName, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None, limit: None, resets_at: None, headers: Vec::new() }
    }

    pub fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_owned());
        self
    }

    pub fn with_header(mut self, name: header::HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn into_response(self) -> Response<Body> {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
                limit: self.limit,
                resets_at: self.limit.map(|_| self.resets_at),
            },
        };
        let text = serde_json::to_string(&body).unwrap_or_default();
        let mut builder = Response::builder().status(self.status).header(header::CONTENT_TYPE, "application/json");
        for (name, value) in self.headers {
            builder = builder.header(name, value);
        }
        builder.body(Body::Text(text)).unwrap_or_else(|_| Response::new(Body::Empty))
    }
}

/// Every error answer's body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

/// What went wrong, in words a client can show, and the field or header to fix.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    #[schema(value_type = ErrorCode)]
    pub code: &'static str,
    pub message: &'a str,
    /// The field (dotted path, e.g. `webhook.url`), query parameter or header to fix.
    pub field: Option<&'a str>,
    /// On a 429: the limit that refused (see `GET /v1/usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<kiln_app::limits::LimitName>)]
    pub limit: Option<&'static str>,
    /// On a 429: when the limit frees up; `null` for `max_active_jobs` (it frees when a job ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub resets_at: Option<Option<chrono::DateTime<chrono::Utc>>>,
}

/// The error codes, stable for scripts: what `error.code` can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not JSON, or not an object.
    InvalidJson,
    /// A field has the wrong JSON type.
    InvalidType,
    MissingField,
    UnknownField,
    /// A field is out of its range or not one of its values.
    InvalidValue,
    UnknownModel,
    /// No valid API key (`Authorization: Bearer <key>`).
    Unauthorized,
    /// No such job for this tenant.
    NotFound,
    /// Canceling a job that has ended.
    AlreadyFinished,
    /// The `Idempotency-Key` was used before with another body.
    IdempotencyKeyReused,
    QueueUnavailable,
    /// `max_active_jobs`.
    QuotaExceeded,
    /// `jobs_per_minute`.
    RateLimited,
    /// `units_per_day`.
    UnitsExhausted,
    /// Too many concurrent writes to the same record: retry.
    Contention,
    BackendUnavailable,
    Internal,
    RouteNotFound,
    MethodNotAllowed,
    BodyTooLarge,
    UnsupportedMediaType,
}

impl From<AppError> for ApiError {
    fn from(err: AppError) -> Self {
        use StatusCode as S;
        let status = match &err {
            AppError::Input(input) => match input.kind {
                InputErrorKind::InvalidValue | InputErrorKind::UnknownModel => S::UNPROCESSABLE_ENTITY,
                _ => S::BAD_REQUEST,
            },
            AppError::Unauthorized(_) => S::UNAUTHORIZED,
            AppError::NotFound(_) => S::NOT_FOUND,
            AppError::AlreadyFinished { .. } => S::CONFLICT,
            AppError::IdempotencyMismatch => S::UNPROCESSABLE_ENTITY,
            AppError::QuotaExceeded { .. } | AppError::RateLimited { .. } | AppError::UnitsExhausted { .. } => {
                S::TOO_MANY_REQUESTS
            }
            AppError::QueueUnavailable(_) | AppError::Contention | AppError::Port(PortError::Unavailable { .. }) => {
                S::SERVICE_UNAVAILABLE
            }
            AppError::Port(PortError::Corrupt { .. }) | AppError::Transition(_) => S::INTERNAL_SERVER_ERROR,
        };
        match &err {
            AppError::QueueUnavailable(source) => warn!(error = %source, "job queue unavailable"),
            AppError::Port(PortError::Unavailable { backend, source }) => {
                error!(backend, error = %source, "backend unavailable")
            }
            AppError::Port(PortError::Corrupt { .. }) => error!(error = %err, "corrupt stored data"),
            AppError::Transition(transition) => error!(error = %transition, "illegal transition"),
            _ => {}
        }
        let mut answer = ApiError::new(status, err.code(), err.client_message());
        answer.field = err.field().map(str::to_owned);
        if let Some((limit, resets_at)) = err.exceeded_limit() {
            answer.limit = Some(limit.as_str());
            answer.resets_at = resets_at;
        }
        match &err {
            AppError::Unauthorized(_) => answer.with_header(header::WWW_AUTHENTICATE, "Bearer"),
            AppError::RateLimited { retry_after_secs, .. } | AppError::UnitsExhausted { retry_after_secs, .. } => {
                answer.with_header(header::RETRY_AFTER, retry_after_secs.to_string())
            }
            _ if status == S::SERVICE_UNAVAILABLE => answer.with_header(header::RETRY_AFTER, "1"),
            _ => answer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_domain::{InputError, JobId, JobStatus};

    /// Every code an answer can carry is in the document's `ErrorCode` (the codes of the use
    /// cases' errors, and those of the HTTP layer's own refusals).
    #[test]
    fn every_error_code_is_documented() {
        let doc = serde_json::to_value(crate::openapi::document()).unwrap();
        let documented: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .expect("ErrorCode's values")
            .iter()
            .map(|code| code.as_str().unwrap())
            .collect();
        let now = chrono::Utc::now();
        let input = |kind| AppError::Input(InputError::new(kind, None, "x"));
        let errors = [
            input(InputErrorKind::InvalidJson),
            input(InputErrorKind::InvalidType),
            input(InputErrorKind::MissingField),
            input(InputErrorKind::UnknownField),
            input(InputErrorKind::InvalidValue),
            input(InputErrorKind::UnknownModel),
            AppError::Unauthorized("x"),
            AppError::NotFound("x".into()),
            AppError::AlreadyFinished { id: JobId::generate(now), status: JobStatus::Succeeded },
            AppError::IdempotencyMismatch,
            AppError::QueueUnavailable(PortError::unavailable("sqs", "down")),
            AppError::QuotaExceeded { limit: 1 },
            AppError::RateLimited { limit: 1, retry_after_secs: 1, resets_at: now },
            AppError::UnitsExhausted { limit: 1, used: 1, cost: 1, resets_at: now, retry_after_secs: 1 },
            AppError::Contention,
            AppError::Port(PortError::unavailable("dynamodb", "down")),
            AppError::Port(PortError::Corrupt { what: "job", detail: "x".into() }),
            AppError::Transition(kiln_domain::IllegalTransition {
                id: JobId::generate(now),
                from: JobStatus::Succeeded,
                to: JobStatus::Running,
            }),
        ];
        // A new AppError variant stops this compiling until it is added to `errors` above.
        for error in &errors {
            match error {
                AppError::Input(_)
                | AppError::Unauthorized(_)
                | AppError::NotFound(_)
                | AppError::AlreadyFinished { .. }
                | AppError::IdempotencyMismatch
                | AppError::QueueUnavailable(_)
                | AppError::QuotaExceeded { .. }
                | AppError::RateLimited { .. }
                | AppError::UnitsExhausted { .. }
                | AppError::Contention
                | AppError::Port(_)
                | AppError::Transition(_) => {}
            }
        }
        let mut codes: Vec<&str> = errors.iter().map(AppError::code).collect();
        let http_layer = include_str!("routes.rs");
        for code in ["route_not_found", "method_not_allowed", "body_too_large", "unsupported_media_type", "internal"] {
            assert!(http_layer.contains(&format!("\"{code}\"")), "routes.rs no longer answers {code}");
            codes.push(code);
        }
        for code in codes {
            assert!(documented.contains(&code), "`{code}` is not in the document's ErrorCode: {documented:?}");
        }
    }
}

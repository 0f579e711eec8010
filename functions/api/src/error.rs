//! The one place where errors become HTTP statuses and `{"error": {code, message, field}}` bodies.

use http::{Response, StatusCode, header};
use kiln_app::{AppError, ports::PortError};
use kiln_domain::InputErrorKind;
use lambda_http::Body;
use serde_json::json;
use tracing::{error, warn};

/// A failure answered to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub headers: Vec<(header::HeaderName, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None, headers: Vec::new() }
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
        let body = json!({"error": {"code": self.code, "message": self.message, "field": self.field}});
        let mut builder = Response::builder().status(self.status).header(header::CONTENT_TYPE, "application/json");
        for (name, value) in self.headers {
            builder = builder.header(name, value);
        }
        builder.body(Body::Text(body.to_string())).unwrap_or_else(|_| Response::new(Body::Empty))
    }
}

impl From<AppError> for ApiError {
    fn from(err: AppError) -> Self {
        use StatusCode as S;
        match err {
            AppError::Input(input) => {
                let status = match input.kind {
                    InputErrorKind::InvalidValue | InputErrorKind::UnknownModel => S::UNPROCESSABLE_ENTITY,
                    _ => S::BAD_REQUEST,
                };
                Self {
                    status,
                    code: input.kind.code(),
                    message: input.message,
                    field: input.field,
                    headers: Vec::new(),
                }
            }
            AppError::Unauthorized(message) => ApiError::new(S::UNAUTHORIZED, "unauthorized", message)
                .with_field("Authorization")
                .with_header(header::WWW_AUTHENTICATE, "Bearer"),
            AppError::NotFound(_) => ApiError::new(S::NOT_FOUND, "not_found", err.to_string()).with_field("id"),
            AppError::AlreadyFinished { .. } => ApiError::new(S::CONFLICT, "already_finished", err.to_string()),
            AppError::IdempotencyMismatch => {
                ApiError::new(S::UNPROCESSABLE_ENTITY, "idempotency_key_reused", err.to_string())
                    .with_field("Idempotency-Key")
            }
            AppError::QueueUnavailable(ref source) => {
                warn!(error = %source, "job queue unavailable");
                ApiError::new(S::SERVICE_UNAVAILABLE, "queue_unavailable", err.to_string())
                    .with_header(header::RETRY_AFTER, "1")
            }
            AppError::QuotaExceeded { .. } => ApiError::new(S::TOO_MANY_REQUESTS, "quota_exceeded", err.to_string()),
            AppError::RateLimited { retry_after_secs, .. } => {
                ApiError::new(S::TOO_MANY_REQUESTS, "rate_limited", err.to_string())
                    .with_header(header::RETRY_AFTER, retry_after_secs.to_string())
            }
            AppError::Contention => ApiError::new(S::SERVICE_UNAVAILABLE, "contention", err.to_string())
                .with_header(header::RETRY_AFTER, "1"),
            AppError::Port(PortError::Unavailable { backend, source }) => {
                error!(backend, error = %source, "backend unavailable");
                ApiError::new(
                    S::SERVICE_UNAVAILABLE,
                    "backend_unavailable",
                    format!("{backend} is unavailable; try again"),
                )
                .with_header(header::RETRY_AFTER, "1")
            }
            AppError::Port(corrupt @ PortError::Corrupt { .. }) => {
                error!(error = %corrupt, "corrupt stored data");
                ApiError::new(S::INTERNAL_SERVER_ERROR, "internal", "internal error")
            }
            AppError::Transition(transition) => {
                error!(error = %transition, "illegal transition");
                ApiError::new(S::INTERNAL_SERVER_ERROR, "internal", "internal error")
            }
        }
    }
}
